"""Coverage-guided fuzzing of ``extproc.api.parse_request`` with atheris (libFuzzer). Not run in CI.

    .venv/bin/python benchmarks/fuzz_atheris.py --runs 200000 [--max-len 65536] [-- extra libFuzzer flags]

The property: parse_request returns an InferenceRequest or raises RequestError with a 4xx status; any other
exception is a crash that libFuzzer reports (with the input saved as crash-*). The first input byte picks the
API path and a few control headers so those branches are fuzzed too. libFuzzer prints the executions run.
"""

from __future__ import annotations

import argparse
import sys

import atheris

with atheris.instrument_imports():
    from extproc.api import InferenceRequest, RequestError, parse_request

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v2/unknown")
HEADER_SETS: tuple[dict[str, str], ...] = (
    {},
    {"x-gateway-inference-priority": "-1"},
    {"x-gateway-inference-objective": "batch"},
    {"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "nan"},
    {"x-gateway-model-name-rewrite": "other"},
    {"x-gateway-inference-priority": "high"},
)


def one_input(data: bytes) -> None:
    if not data:
        return
    sel = data[0]
    path = PATHS[sel % len(PATHS)]
    headers = HEADER_SETS[(sel // len(PATHS)) % len(HEADER_SETS)]
    try:
        req = parse_request(path, data[1:], headers, max_body_bytes=1 << 20, priority_of_objective={"batch": -1})
    except RequestError as e:
        if not 400 <= e.status < 500:
            raise AssertionError(f"RequestError with status {e.status}") from e
        return
    if not isinstance(req, InferenceRequest) or not req.model:
        raise AssertionError("parse_request returned a request without a model")


SEEDS = (
    b'\x00{"model":"m","prompt":"hello","max_tokens":4,"stream":true}',
    b'\x01{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}',
    b'\x02{"model":"m","input":["a","b"]}',
    b'\x03{"model":"m","input":"x","instructions":"be brief","max_output_tokens":3}',
    b'\x00{"model":"m","prompt":[[1,2],[3]],"stream_options":{"include_usage":true}}',
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--max-len", type=int, default=65_536)
    ap.add_argument("--corpus", default=None, help="corpus directory (default: a temporary one seeded with valid requests)")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    import tempfile
    from pathlib import Path

    corpus = Path(args.corpus or tempfile.mkdtemp(prefix="extproc-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(s)
    argv = [sys.argv[0], f"-runs={args.runs}", f"-max_len={args.max_len}", str(corpus), *[a for a in args.rest if a != "--"]]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()  # libFuzzer prints "Done N runs in S second(s)" and exits the process when -runs is reached
    return 0


if __name__ == "__main__":
    sys.exit(main())
