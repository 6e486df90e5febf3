"""Cross-check our load generator against an external one: aiperf (the PyPI package).

For each setup a fresh fleet and the setup's proxy are started; our client (closed loop, ``concurrency`` streams
in flight, ``requests`` requests of ``isl`` prompt tokens and exactly ``osl`` output tokens) runs first, then
``aiperf profile`` with the same fixed-concurrency load against the same URL. Both tools' TTFT, inter-token
latency, E2E latency and throughput go side by side into ``report.json`` (``setups.<name>.aiperf``) and
``report.md``.

Definitions match: TTFT is the time to the first streamed chunk with content, ITL is
(E2E − TTFT) / (output tokens − 1) per request (aiperf's ``inter_token_latency``, our TPOT), output token
throughput is all output tokens over the span from the first request sent to the last one finished. Output
token counts come from the server's ``usage`` chunk in both (``--use-server-token-count``).

aiperf pins its own dependency versions, so it lives in its own venv (``scripts/aiperf_setup.sh`` →
``<repo>/.venv-aiperf``); ``EXTPROC_AIPERF`` overrides the executable. Its tokenizer is the tiny local model
directory (``extproc.sim.tiny_model``), which AutoTokenizer loads offline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from extproc.bench.client import send_one
from extproc.bench.report import RequestResult, percentile
from extproc.bench.workloads import MODEL, WorkloadRequest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = "scripts/aiperf_setup.sh"
EXPORT_FILE = "profile_export_aiperf.json"
QUANTILES = ("avg", "p50", "p90", "p99")
# aiperf metric tag → our key (values converted to ms by the metric's unit)
AIPERF_METRICS = {
    "time_to_first_token": "ttft_ms",
    "inter_token_latency": "itl_ms",
    "request_latency": "e2e_ms",
}
_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "sec": 1000.0, "us": 0.001, "ns": 1e-6}


@dataclass(slots=True, frozen=True)
class FixedLoad:
    """A closed-loop load both tools can express: ``concurrency`` streams in flight until ``requests`` are done."""

    concurrency: int = 8
    requests: int = 200
    isl: int = 128
    osl: int = 32
    api: str = "completions"  # "completions" | "chat"

    def validate(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.isl < 1 or self.osl < 2:
            raise ValueError("aiperf load needs concurrency >= 1, requests >= 1, isl >= 1, osl >= 2")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"aiperf api must be 'completions' or 'chat', got {self.api!r}")


def find_aiperf() -> str | None:
    """The aiperf executable: ``$EXTPROC_AIPERF``, then ``<repo>/.venv-aiperf/bin/aiperf``, then ``PATH``."""
    env = os.environ.get("EXTPROC_AIPERF")
    if env:
        return env if os.access(env, os.X_OK) else None
    local = REPO_ROOT / ".venv-aiperf" / "bin" / "aiperf"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("aiperf")


def availability() -> str | None:
    """None when aiperf can run, else why not."""
    if find_aiperf() is None:
        return f"aiperf is not installed (run `bash {SETUP_SCRIPT}` or set EXTPROC_AIPERF)"
    return None


def tokenizer_dir(cache_root: str | os.PathLike[str]) -> Path:
    """Build (once) the tiny local tokenizer directory under ``cache_root`` and return it."""
    from extproc.sim.tiny_model import build_tiny_model

    return build_tiny_model(Path(cache_root) / "aiperf-tokenizer")


# ------------------------------------------------------------------------------------------- our client


def make_requests(load: FixedLoad, tok_dir: Path, *, model: str = MODEL, seed: int = 0) -> list[WorkloadRequest]:
    """``load.requests`` distinct prompts of exactly ``load.isl`` tokens of the local tokenizer (like aiperf's
    synthetic prompts: random text, no shared prefix) asking for exactly ``load.osl`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t.isascii() and t.strip().isalpha()]
    if not vocab:
        raise ValueError(f"tokenizer in {tok_dir} has no plain word pieces")
    rng = random.Random(seed)
    out: list[WorkloadRequest] = []
    for i in range(load.requests):
        ids = tok.encode(" ".join(rng.choice(vocab) for _ in range(load.isl * 2))).ids[: load.isl]
        text = tok.decode(ids)
        if load.api == "chat":
            out.append(WorkloadRequest(i, 0, 0.0, "chat", model, load.osl, messages=(("user", text),)))
        else:
            out.append(WorkloadRequest(i, 0, 0.0, "completions", model, load.osl, parts=(text,)))
    return out


async def run_ours(url: str, reqs: Sequence[WorkloadRequest], concurrency: int, timeout_s: float = 300.0) -> list[RequestResult]:
    """Closed loop: ``concurrency`` workers each send the next request as soon as their last one finishes."""
    results: list[RequestResult] = []
    queue: asyncio.Queue[WorkloadRequest] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await send_one(session, url, r, t0, timeout_s))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    results.sort(key=lambda r: r.index)
    return results


def _q(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {k: None for k in QUANTILES}
    out: dict[str, float | None] = {"avg": round(sum(values) / len(values), 3)}
    for k in QUANTILES[1:]:
        out[k] = round(percentile(values, float(k[1:])), 3)
    return out


def summarize_ours(results: Sequence[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    span = (max(r.end for r in ok) - min(r.start for r in ok)) if ok else 0.0
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "ttft_ms": _q([r.ttft_ms for r in ok]),
        "itl_ms": _q([r.tpot_ms for r in ok if r.output_tokens > 1]),
        "e2e_ms": _q([r.e2e_ms for r in ok]),
        "output_tokens_per_request": round(tokens / len(ok), 2) if ok else None,
        "output_tok_s": round(tokens / span, 2) if span > 0 else None,
        "request_throughput": round(len(ok) / span, 3) if span > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ aiperf


def aiperf_command(exe: str, url: str, load: FixedLoad, tok_dir: Path, artifact_dir: Path, *, model: str = MODEL) -> list[str]:
    return [
        exe, "profile",
        "--model", model,
        "--url", url,
        "--endpoint-type", load.api,
        "--streaming",
        "--tokenizer", str(tok_dir),
        "--use-server-token-count",
        "--concurrency", str(load.concurrency),
        "--request-count", str(load.requests),
        "--isl", str(load.isl),
        "--osl", str(load.osl),
        "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", f"min_tokens:{load.osl}",
        "--ui-type", "none",
        "--artifact-dir", str(artifact_dir),
    ]  # fmt: skip


def _metric(data: dict[str, Any], tag: str) -> dict[str, Any] | None:
    for scope in (data, data.get("records") or {}, data.get("metrics") or {}):
        m = scope.get(tag) if isinstance(scope, dict) else None
        if isinstance(m, dict):
            return m
    return None


def parse_export(data: dict[str, Any]) -> dict[str, Any]:
    """aiperf's ``profile_export_aiperf.json`` → the same shape as :func:`summarize_ours`."""
    out: dict[str, Any] = {}
    for tag, key in AIPERF_METRICS.items():
        m = _metric(data, tag)
        if m is None:
            out[key] = {k: None for k in QUANTILES}
            continue
        scale = _UNIT_TO_MS.get(str(m.get("unit", "ms")).lower(), 1.0)
        out[key] = {k: (round(float(m[k]) * scale, 3) if m.get(k) is not None else None) for k in QUANTILES}

    def avg(tag: str) -> float | None:
        m = _metric(data, tag)
        return None if m is None or m.get("avg") is None else float(m["avg"])

    count = avg("request_count")
    errors = avg("error_request_count")
    if errors is None:  # older exports: only the per-error-type summary
        summary = data.get("error_summary") or []
        errors = float(sum(int(e.get("count", 0)) for e in summary if isinstance(e, dict)))
    osl = avg("output_sequence_length")
    tps = avg("output_token_throughput")
    rps = avg("request_throughput")
    out.update({
        "requests": None if count is None else int(count + errors),
        "ok": None if count is None else int(count),
        "errors": int(errors),
        "output_tokens_per_request": None if osl is None else round(osl, 2),
        "output_tok_s": None if tps is None else round(tps, 2),
        "request_throughput": None if rps is None else round(rps, 3),
    })  # fmt: skip
    return out


async def run_aiperf(
    url: str, load: FixedLoad, tok_dir: Path, artifact_dir: Path, *, model: str = MODEL, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Run one ``aiperf profile`` and return its parsed numbers; raises RuntimeError with its log tail on failure."""
    exe = find_aiperf()
    if exe is None:
        raise RuntimeError(availability() or "aiperf not found")
    artifact_dir.mkdir(parents=True, exist_ok=True)
    cmd = aiperf_command(exe, url, load, tok_dir, artifact_dir, model=model)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("NO_COLOR", "1")
    log_path = artifact_dir / "aiperf.log"
    log.info("running aiperf", extra={"url": url, "load": asdict(load)})
    with open(log_path, "wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await _kill_group(proc)
            raise
    exports = sorted(artifact_dir.rglob(EXPORT_FILE), key=lambda p: p.stat().st_mtime)
    if rc != 0 or not exports:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
        raise RuntimeError(f"aiperf exited {rc} ({'no ' + EXPORT_FILE if not exports else 'see ' + str(log_path)}): {tail}")
    with open(exports[-1], encoding="utf-8") as f:
        parsed = parse_export(json.load(f))
    parsed["export"] = str(exports[-1])
    return parsed


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            continue


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """aiperf ÷ ours for the headline numbers (1.0 = the tools agree)."""
    pairs = {
        "ttft_p50": ("ttft_ms", "p50"),
        "itl_p50": ("itl_ms", "p50"),
        "e2e_p50": ("e2e_ms", "p50"),
        "output_tok_s": ("output_tok_s", None),
        "request_throughput": ("request_throughput", None),
    }
    out: dict[str, float | None] = {}
    for name, (key, sub) in pairs.items():
        a = theirs.get(key)
        b = ours.get(key)
        if sub is not None:
            a = a.get(sub) if isinstance(a, dict) else None
            b = b.get(sub) if isinstance(b, dict) else None
        out[name] = round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return out


async def cross_check_url(
    url: str, load: FixedLoad, work_dir: Path, *, model: str = MODEL, seed: int = 0, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Both tools, one after the other, against one running stack. Returns the ``aiperf`` report entry."""
    tok = tokenizer_dir(work_dir)
    reqs = make_requests(load, tok, model=model, seed=seed)
    ours = summarize_ours(await run_ours(url, reqs, load.concurrency))
    theirs = await run_aiperf(url, load, tok, work_dir, model=model, timeout_s=timeout_s)
    return {"status": "ok", "load": asdict(load), "ours": ours, "aiperf": theirs, "ratio_aiperf_over_ours": compare(ours, theirs)}


# ----------------------------------------------------------------------------------------- bench wiring


async def cross_check_setups(setups: Sequence[Any], fleet: Any, out_dir: str, load: FixedLoad) -> dict[str, dict[str, Any]]:
    """For each setup (``SetupSpec``): a fresh fleet (``runner.FleetOptions``) and the setup's proxy, then
    :func:`cross_check_url`. A setup that fails is reported with its reason, never dropped."""
    from extproc.bench import peers
    from extproc.harness import Stack, StackSpec, start_sim_process, stop_process

    why = availability()
    results: dict[str, dict[str, Any]] = {}
    for s in setups:
        if why:
            results[s.name] = {"status": "skipped", "reason": why, "load": asdict(load)}
            continue
        work = Path(out_dir) / "aiperf" / s.name
        try:
            proc, info = await start_sim_process(fleet.sim_args(kv_events=s.kv_events))
            try:
                endpoints: list[str] = list(info["endpoints"])
                proxy: Any
                if s.kind == "peer":
                    proxy = peers.PeerRouter(s.name, [f"http://{a}" for a in endpoints], log_path=str(work) + ".router.log")
                else:
                    proxy = Stack(StackSpec(
                        endpoints=endpoints,
                        config=s.config if s.kind == "extproc" else None,
                        lb_policy=s.lb_policy,
                        labels=dict(info.get("labels") or {}),
                        kv_events=info.get("kv_events") if s.kv_events else None,
                        models=[MODEL, *fleet.loras],
                        scheduler_args=["--seed", str(fleet.seed)] + (["--tokenizer", f"{MODEL}=sim"] if s.kv_events else []),
                    ))  # fmt: skip
                async with proxy:
                    results[s.name] = await cross_check_url(proxy.url, load, work, seed=fleet.seed)
            finally:
                await stop_process(proc)
        except Exception as e:  # reported in report.json, the rest of the bench still runs
            log.exception("aiperf cross-check failed", extra={"setup": s.name})
            results[s.name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:800], "load": asdict(load)}
    return results


def attach(report: dict[str, Any], cross: dict[str, dict[str, Any]]) -> None:
    """Put each setup's cross-check under ``report['setups'][name]['aiperf']``."""
    for name, entry in cross.items():
        if name in report.get("setups", {}):
            report["setups"][name]["aiperf"] = entry

