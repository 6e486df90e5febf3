"""prefill-backlog-scorer (least work left on prefill pods) and queue-aware-pd-decider (prefill on the decode pod
when the prefill pool is queued): decisions on fixed pod states and a virtual clock."""

from __future__ import annotations

import pytest

from extproc.api import InferenceRequest
from extproc.cycle import Observation
from extproc.datalayer.endpoint import Endpoint, EndpointPool
from extproc.plugin import PREFIX_CACHED_TOKENS, PREFIX_SCORES, CycleState
from extproc.predictor.features import set_clock
from extproc.scheduling.framework import ProfileResult, SchedulingResult
from extproc.scheduling.plugins.pd_deciders import QueueAwarePDDecider
from extproc.scheduling.plugins.prefill_backlog import PrefillBacklogScorer

from plugin_testlib import MODEL, make_request

PREFILL = "x-prefiller-host-port"
PROMPT = "word " * 4000  # 5,000 tokens by the 4-characters estimate


@pytest.fixture()
def now():  # type: ignore[no-untyped-def]
    t = [100.0]
    prev = set_clock(lambda: t[0])
    yield t
    set_clock(prev)


def _eps(n: int = 3) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000", {"llm-d.ai/role": "prefill"}, [MODEL]) for i in range(n)]


def _send(s: PrefillBacklogScorer, req: InferenceRequest, pods: list[Endpoint], pick: Endpoint) -> CycleState:
    cycle = CycleState()
    s.score(cycle, req, pods)
    res = SchedulingResult({"decode": ProfileResult("decode", [Endpoint("10.0.0.9:8000")])}, "decode", {PREFILL: pick.address})
    s.pre_request(cycle, req, res)
    pick.add_inflight(req.prompt_tokens_estimate)
    return cycle


def test_least_work_left_beats_fewest_tokens(now) -> None:  # type: ignore[no-untyped-def]
    s = PrefillBacklogScorer(ms_per_token=0.02, learn=False)  # 5,000 tokens = 100 ms
    a, b, c = _eps()
    req = make_request(prompt=PROMPT)
    _send(s, req, [a, b, c], a)  # a: busy until 100.1
    now[0] = 100.09
    _send(s, req, [a, b, c], b)  # b: busy until 100.19
    now[0] = 100.095
    # c idle; a has 5 ms left, b 95 ms (both hold the same tokens): c < a < b
    sc = s.score(CycleState(), req, [a, b, c])
    assert sc[2] == 1.0 and sc[1] == 0.0 and 0.0 < sc[0] < 1.0
    c.add_inflight(5000)
    s.busy_until[c.address] = 100.195  # c just got a prompt: 100 ms left
    sc = s.score(CycleState(), req, [a, b, c])
    assert sc.index(max(sc)) == 0  # a finishes first although every pod holds one prompt


def test_backlog_clamped_to_work_in_flight_and_reset_when_empty(now) -> None:  # type: ignore[no-untyped-def]
    s = PrefillBacklogScorer(ms_per_token=0.02, learn=False)
    a, b, _ = _eps()
    req = make_request(prompt=PROMPT)
    for _ in range(3):
        _send(s, req, [a, b], a)
    assert s.backlog_ms(a, now[0]) == pytest.approx(300.0)
    a.release_inflight(prefill_tokens=5000)
    a.release_inflight(prefill_tokens=5000)  # two legs ended early: only one prompt's work can be left
    assert s.backlog_ms(a, now[0]) == pytest.approx(100.0)
    a.release_inflight(prefill_tokens=5000)
    assert s.backlog_ms(a, now[0]) == 0.0
    _send(s, req, [a, b], a)  # an idle pod starts its new work now, not after the stale clock
    assert s.busy_until[a.address] == pytest.approx(now[0] + 0.1)


def test_prefix_cached_tokens_are_not_work(now) -> None:  # type: ignore[no-untyped-def]
    s = PrefillBacklogScorer(ms_per_token=0.02, learn=False)
    a, b, _ = _eps()
    cycle = CycleState()
    cycle.data[PREFIX_SCORES] = {b.address: 0.9}
    sc = s.score(cycle, make_request(prompt=PROMPT), [a, b])
    assert sc == [0.0, 1.0]


def test_rate_learned_from_legs_that_found_the_pod_idle(now) -> None:  # type: ignore[no-untyped-def]
    s = PrefillBacklogScorer(ms_per_token=0.02)
    a, b, _ = _eps()
    for _ in range(60):
        req = make_request(prompt=PROMPT)
        _send(s, req, [a, b], a)
        a.release_inflight(prefill_tokens=5000)
        obs = Observation("r", "10.0.0.9:8000", MODEL, 5000, 0.0, prefill_endpoint=a.address, prefill_ms=400.0)
        s.on_complete(req, obs)
    assert s.samples == 60
    assert s.ms_per_token == pytest.approx(0.08, rel=0.01)  # 400 ms / 5,000 tokens: a 4x slower pod
    # a leg that queued behind another tells nothing about the rate
    req = make_request(prompt=PROMPT)
    _send(s, req, [a, b], a)
    req2 = make_request(prompt=PROMPT)
    _send(s, req2, [a, b], a)
    s.on_complete(req2, Observation("r", "x:1", MODEL, 5000, 0.0, prefill_endpoint=a.address, prefill_ms=5000.0))
    assert s.samples == 60


def _pd_pool() -> EndpointPool:
    pool = EndpointPool(default_models=frozenset({MODEL}))
    addrs = [f"10.0.0.{i}:8000" for i in range(4)]
    pool.set_endpoints(addrs, {a: {"llm-d.ai/role": "prefill" if i < 2 else "decode"} for i, a in enumerate(addrs)})
    return pool


def test_queue_aware_decider_prefills_locally_only_when_the_pool_is_queued() -> None:
    pool = _pd_pool()
    p0, p1, d0, _ = pool.snapshot()
    dec = QueueAwarePDDecider(non_cached_tokens=256, max_prefill_queue_tokens=4000, pool=pool)
    req = make_request(prompt=PROMPT)
    cycle = CycleState()
    cycle.data[PREFIX_CACHED_TOKENS] = {d0.address: 0}
    assert dec.disaggregate(cycle, req, d0)  # idle prefill pool: split
    p0.add_inflight(5000)
    assert dec.disaggregate(cycle, req, d0)  # p1 is free: split
    p1.add_inflight(4500)
    assert not dec.disaggregate(cycle, req, d0)  # every prefill pod busy, the decode pod is not: local
    assert dec.decisions["local_queued"] == 1
    d0.add_inflight(5000)  # the decode pod is prefilling one of its own already
    assert dec.disaggregate(cycle, req, d0)
    # the prefix rule still comes first: a prompt mostly cached on the decode pod never splits
    cycle.data[PREFIX_CACHED_TOKENS] = {d0.address: 4900}
    assert not dec.disaggregate(cycle, req, d0)
    assert dec.decisions["local_queued"] == 1
    off = QueueAwarePDDecider(non_cached_tokens=256, max_prefill_queue_tokens=0, pool=pool)
    cycle.data[PREFIX_CACHED_TOKENS] = {d0.address: 0}
    d0.release_inflight(prefill_tokens=5000)
    assert off.disaggregate(cycle, req, d0)  # 0 = the prefix-based decider exactly
