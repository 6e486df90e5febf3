"""Workload traces: deterministic from (name, stages, seed), well-formed, with the advertised shapes."""

from __future__ import annotations

import json

import pytest

from extproc.api import parse_request
from extproc.bench.workloads import LORAS, WORKLOADS, Stage, generate, parse_stages

SHORT = [Stage(4.0, 3.0), Stage(8.0, 3.0)]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_trace(name: str) -> None:
    a = generate(name, SHORT, seed=3)
    b = generate(name, SHORT, seed=3)
    assert len(a.requests) == len(b.requests) > 0
    for x, y in zip(a.requests, b.requests):
        assert x.arrival == y.arrival
        assert x.body_bytes() == y.body_bytes()


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_other_seed_other_trace(name: str) -> None:
    a = generate(name, SHORT, seed=1)
    b = generate(name, SHORT, seed=2)
    assert [r.arrival for r in a.requests] != [r.arrival for r in b.requests]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_requests_parse_and_are_ordered(name: str) -> None:
    wl = generate(name, SHORT, seed=0)
    arrivals = [r.arrival for r in wl.requests]
    assert arrivals == sorted(arrivals)
    bounds = wl.stage_bounds()
    for r in wl.requests:
        lo, hi = bounds[r.stage]
        assert lo <= r.arrival < hi
        req = parse_request(r.path, r.body_bytes(), r.headers())
        assert req.stream and req.include_usage
        assert req.max_tokens == r.max_tokens > 0


def test_shared_prefix_shares_system_prompts() -> None:
    wl = generate("shared-prefix", [Stage(50.0, 4.0)], seed=0)
    by_group: dict[int, set[str]] = {}
    for r in wl.requests:
        by_group.setdefault(r.group, set()).add(r.parts[0])
    assert len(by_group) > 1
    assert all(len(s) == 1 for s in by_group.values())  # one system prompt per group
    assert len({next(iter(s)) for s in by_group.values()}) == len(by_group)  # distinct across groups


def test_multi_turn_resends_history() -> None:
    wl = generate("multi-turn", [Stage(30.0, 5.0)], seed=0)
    last: dict[str, tuple[tuple[str, str], ...]] = {}
    grew = 0
    for r in wl.requests:
        prev = last.get(r.session)
        if prev is not None:
            assert r.messages[: len(prev)] == prev  # history is a strict prefix of the next turn
            grew += 1
        last[r.session] = r.messages
    assert grew > 0


def test_multi_lora_uses_adapters() -> None:
    wl = generate("multi-lora", [Stage(100.0, 4.0)], seed=0)
    models = {r.model for r in wl.requests}
    assert models <= set(LORAS) and len(models) >= 3
    assert wl.loras == LORAS


def test_long_prompts_are_100_to_200_kb() -> None:
    wl = generate("long-prompts", [Stage(2.0, 4.0)], seed=0)
    assert wl.requests
    for r in wl.requests:
        assert 100_000 <= len(r.body_bytes()) <= 210_000


def test_bursty_arrivals_cluster() -> None:
    wl = generate("bursty", [Stage(20.0, 8.0)], seed=0)
    # every arrival falls in the first 0.1 s of a 2 s period
    assert all((r.arrival % 2.0) < 0.1 + 1e-9 for r in wl.requests)


def test_parse_stages() -> None:
    assert parse_stages("2:30, 4.5:10") == [Stage(2.0, 30.0), Stage(4.5, 10.0)]
    for bad in ("", "3", "0:10", "2:-1", "x:1"):
        with pytest.raises(ValueError):
            parse_stages(bad)


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        generate("nope")


def test_body_is_json_with_stream_usage() -> None:
    r = generate("shared-prefix", SHORT, seed=0).requests[0]
    b = json.loads(r.body_bytes())
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["prompt"] == r.prompt()


def test_three_vendor_fleet_mixes_three_vendors_never_seen_by_the_warm_start_model() -> None:
    from extproc.bench.virtual import layout
    from extproc.predictor.persistence import load_initial_model
    from extproc.sim.profiles import get_profile, parse_fleet

    wl = generate("three-vendor", seed=0)
    profiles = [get_profile(n) for n, _ in parse_fleet(wl.fleet)]
    accel = {p.accelerator for p in profiles}
    assert any("MI300X" in a for a in accel) and any("Gaudi3" in a for a in accel) and any("L40S" in a for a in accel)
    for p in profiles:
        assert p.sources and ("data sheet" in p.sources or "white paper" in p.sources or "b0:" in p.sources)
    labels = layout(wl.fleet).labels
    assert {v["accelerator"] for v in labels.values()} == accel  # pods expose hardware, not profile names
    model, _ = load_initial_model(None, "builtin")
    assert model is not None
    assert not ({get_profile("llama3-8b-mi300x").accelerator, get_profile("llama3-8b-gaudi3").accelerator} & set(model.pod_classes))


def test_pd_prompts_are_long_cold_and_short_output() -> None:
    from extproc.bench.workloads import PDParams

    wl = generate("pd", parse_stages("40:15"), seed=0)
    reqs = wl.requests
    assert wl.fleet == "llama3-8b-h100-roofline:8" and wl.pd_prefill == 4
    assert all(r.max_tokens == 250 for r in reqs)
    sizes = [len("".join(r.parts)) for r in reqs]
    assert min(sizes) > 4_500 * 4 and max(sizes) < 6_000 * 4  # ~4.7k-5.5k tokens of ~4 characters
    # the reference's prompts are random: few documents repeat (the 1,000-document pool made caches warm)
    groups = [r.group for r in reqs]
    assert len(set(groups)) > 0.95 * len(groups)
    assert PDParams().documents >= 10 * len(reqs) // 2
    # the same document is the same text every time it is drawn, and the question is unique
    by_doc: dict[int, str] = {}
    for r in reqs:
        assert by_doc.setdefault(r.group, r.parts[0]) == r.parts[0]
    assert len({r.parts[1] for r in reqs}) == len(reqs)
