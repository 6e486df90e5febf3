"""The virtual-time runner: deterministic, complete, and driven by the real scheduler plugins."""

from __future__ import annotations

from extproc.bench.setups import SETUPS
from extproc.bench.virtual import layout, run_virtual, virtual_availability
from extproc.bench.workloads import Stage, generate


def _wl():  # type: ignore[no-untyped-def]
    return generate("shared-prefix", [Stage(40.0, 3.0)], seed=0)


def test_deterministic_and_complete() -> None:
    wl = _wl()
    fl = layout("4", kv_blocks=800)
    a = run_virtual(wl, SETUPS["extproc-default"], fl, seed=0)
    b = run_virtual(wl, SETUPS["extproc-default"], fl, seed=0)
    assert len(a.results) == len(wl.requests)
    assert [(r.pod, r.ttft_ms, r.e2e_ms) for r in a.results] == [(r.pod, r.ttft_ms, r.e2e_ms) for r in b.results]
    assert all(r.ok and r.output_tokens == 100 and r.e2e_ms >= r.ttft_ms > 0 for r in a.results)


def test_prefix_scheduler_gets_more_cache_hits_than_round_robin() -> None:
    wl = _wl()
    fl = layout("4", kv_blocks=800)
    rr = run_virtual(wl, SETUPS["envoy-rr"], fl, seed=0)
    ext = run_virtual(wl, SETUPS["extproc-default"], fl, seed=0)
    hit = lambda v: sum(h for h, _ in v.prefix) / sum(q for _, q in v.prefix)  # noqa: E731
    assert hit(ext) > hit(rr)
    # round robin spreads evenly over the pods
    pods = [r.pod for r in rr.results]
    counts = [pods.count(p) for p in set(pods)]
    assert len(counts) == 4 and max(counts) - min(counts) <= 1


def test_peers_not_available_in_virtual_time() -> None:
    why = virtual_availability(SETUPS["vllm-router-rr"])
    assert why and "virtual" in why


def test_heterogeneous_layout() -> None:
    fl = layout("llama3-8b-h100:2,llama3-8b-l40s:3")
    assert [p for p, _ in fl.pods] == ["llama3-8b-h100"] * 2 + ["llama3-8b-l40s"] * 3
    assert len(set(a for _, a in fl.pods)) == 5
