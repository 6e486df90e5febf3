"""Per-decision cost of the precise-prefix-cache scorer, tokenization included.

For 8/32 pods and 1/4/16 KB chat prompts (HF byte-level BPE tokenizer of the tiny local model), with an
index that already holds every prompt on one pod (and a shared 50 % prefix on the others), measures:
  cold  = tokenize (cache miss) + hash blocks + index walk + scores
  warm  = the same request again (tokenization LRU hit)
Prints p50/p99 in microseconds. Usage: python benchmarks/precise_prefix_cost.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import BlockStored
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.datalayer.tokenize import Tokenizers
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer
from extproc.sim.tiny_model import build_tiny_model, corpus

BS = 16
ROUNDS = 200


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        build_tiny_model(d)
        text = " ".join(corpus(sentences=4000))
        print(f"{'pods':>5} {'prompt':>7} {'tokens':>7} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} {'warm p99':>9}  (µs)")
        for pods in (8, 32):
            for kb in (1, 4, 16):
                pool = EndpointPool(default_models=frozenset({"tiny"}))
                addrs = [f"10.0.0.{i}:8000" for i in range(pods)]
                pool.set_endpoints(addrs)
                index = KVBlockIndex()
                toks = Tokenizers({"tiny": {"kind": "hf", "path": d}}, cache_size=64)
                scorer = PrecisePrefixCacheScorer("p", index, toks, block_size=BS)
                cold: list[float] = []
                warm: list[float] = []
                for r in range(ROUNDS):
                    start = (r * 997) % (len(text) - kb * 1024 - 1)
                    content = text[start : start + kb * 1024 - 60]
                    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}]}).encode()
                    ids = toks.tokenize(parse_request("/v1/chat/completions", body))
                    assert ids is not None
                    n = len(ids) // BS
                    index.apply(addrs[r % pods], [BlockStored(list(range(1, n + 1)), None, ids[: n * BS], BS)])
                    for a in addrs[:: max(1, pods // 4)]:
                        index.apply(a, [BlockStored(list(range(1, n // 2 + 1)), None, ids[: (n // 2) * BS], BS)])
                    toks._cache.clear()
                    for bucket in (cold, warm):
                        req = parse_request("/v1/chat/completions", body)
                        t0 = time.perf_counter()
                        scorer.score(CycleState(), req, pool.snapshot())
                        bucket.append((time.perf_counter() - t0) * 1e6)
                print(
                    f"{pods:>5} {kb:>5}KB {n * BS:>7} {statistics.median(cold):>9.0f} {pct(cold, 0.99):>9.0f}"
                    f" {statistics.median(warm):>9.0f} {pct(warm, 0.99):>9.0f}"
                )


if __name__ == "__main__":
    main()
