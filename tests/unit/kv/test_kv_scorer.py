"""The precise-prefix-cache scorer: scores from events, media weights, speculative TTL/confirmation,
cycle outputs, fallback to the approximate index, and config wiring."""

from __future__ import annotations

import json
from pathlib import Path

from extproc.api import InferenceRequest, parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import BlockRemoved, BlockStored, KVEventManager
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.datalayer.tokenize import Tokenizers
from extproc.scheduling.config import build_config, load_config
from extproc.scheduling.framework import CycleState, Observation, ProfileResult, SchedulingResult
from extproc.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer
from extproc.scheduling.plugins.prefix import PrefixIndex
from extproc.datalayer.simtokenizer import get_tokenizer

BS = 4
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
MSGS = [{"role": "system", "content": "You are a careful assistant that answers in one line. " * 3}, {"role": "user", "content": "hello there"}]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def request(model: str = "m", messages: list[dict[str, str]] | None = None) -> InferenceRequest:
    return parse_request("/v1/chat/completions", json.dumps({"model": model, "messages": messages or MSGS}).encode())


def setup(clock: Clock | None = None, *, hold: bool = False) -> tuple[EndpointPool, KVBlockIndex, PrecisePrefixCacheScorer, list[int]]:
    pool = EndpointPool(default_models=frozenset({"m", "other"}))
    pool.set_endpoints([A, B, C])
    index = KVBlockIndex(clock=clock or Clock())
    scorer = PrecisePrefixCacheScorer(
        "p", index, Tokenizers({"m": {"kind": "sim"}}), block_size=BS, speculative_ttl_s=2.0, hold_in_flight=hold, max_hold_s=60.0
    )
    tokens = get_tokenizer().encode_chat(MSGS)
    return pool, index, scorer, tokens


def store(index: KVBlockIndex, pod: str, tokens: list[int], nblocks: int, medium: str = "GPU") -> None:
    index.apply(pod, [BlockStored(list(range(1, nblocks + 1)), None, tokens[: nblocks * BS], BS, medium=medium)])


def test_scores_are_matched_fraction_and_cycle_outputs() -> None:
    pool, index, scorer, tokens = setup()
    total = len(tokens) // BS
    store(index, A, tokens, total)
    store(index, B, tokens, total // 2)
    cycle = CycleState()
    req = request()
    scores = scorer.score(cycle, req, pool.snapshot())
    assert scores[0] == 1.0 and scores[2] == 0.0
    assert abs(scores[1] - (total // 2) / total) < 1e-9
    assert cycle.data["prefix_scores"] == {A: scores[0], B: scores[1], C: 0.0}
    assert cycle.data["prompt_token_ids"] == tokens and req.prompt_token_ids == tokens
    assert cycle.data["prefix_matched_blocks"] == {A: total, B: total // 2}
    assert cycle.data["prefix_total_blocks"] == total and cycle.data["prefix_precise"] is True


def test_cpu_tier_is_discounted() -> None:
    pool, index, scorer, tokens = setup()
    total = len(tokens) // BS
    store(index, A, tokens, total, medium="CPU")
    s = scorer.score(CycleState(), request(), pool.snapshot())
    assert abs(s[0] - 0.5) < 1e-9


def test_block_size_comes_from_events_per_pod() -> None:
    pool, index, scorer, tokens = setup()
    index.apply(A, [BlockStored([1, 2], None, tokens[:16], 8)])  # this pod uses 8-token blocks
    s = scorer.score(CycleState(), request(), pool.snapshot())
    assert abs(s[0] - 2 / (len(tokens) // 8)) < 1e-9


def result_for(pool: EndpointPool, addr: str) -> SchedulingResult:
    ep = pool.get(addr)
    assert ep is not None
    return SchedulingResult({"d": ProfileResult("d", [ep])}, "d")


def test_speculative_insert_on_dispatch_expires() -> None:
    clock = Clock()
    pool, index, scorer, tokens = setup(clock)
    cycle = CycleState()
    req = request()
    scorer.score(cycle, req, pool.snapshot())
    scorer.pre_request(cycle, req, result_for(pool, B))
    s = scorer.score(CycleState(), request(), pool.snapshot())
    assert s == [0.0, 1.0, 0.0]
    clock.t += 2.1
    assert scorer.score(CycleState(), request(), pool.snapshot()) == [0.0, 0.0, 0.0]


def test_speculative_confirmed_by_event_survives_ttl() -> None:
    clock = Clock()
    pool, index, scorer, tokens = setup(clock)
    cycle = CycleState()
    req = request()
    scorer.score(cycle, req, pool.snapshot())
    scorer.pre_request(cycle, req, result_for(pool, B))
    store(index, B, tokens, 3)
    clock.t += 5
    s = scorer.score(CycleState(), request(), pool.snapshot())
    assert abs(s[1] - 3 / (len(tokens) // BS)) < 1e-9
    index.apply(B, [BlockRemoved([1])])
    assert scorer.score(CycleState(), request(), pool.snapshot())[1] == 0.0


def test_in_flight_hold_lasts_until_completion() -> None:
    """A request queued longer than any fixed TTL still marks its pod as the prefix's home until it completes;
    after completion only the pod's KV events count."""
    clock = Clock()
    pool, index, scorer, tokens = setup(clock, hold=True)
    total = len(tokens) // BS
    cycle = CycleState()
    req = request()
    scorer.score(cycle, req, pool.snapshot())
    scorer.pre_request(cycle, req, result_for(pool, B))
    clock.t += 30.0  # far past speculativeTtlSeconds
    assert scorer.score(CycleState(), request(), pool.snapshot()) == [0.0, 1.0, 0.0]
    store(index, B, tokens, 2)  # the engine cached (and pins) two blocks while the request runs
    scorer.on_complete(req, Observation(req.request_id, B, "m", len(tokens), dispatch_ts=0.0, status=200))
    s = scorer.score(CycleState(), request(), pool.snapshot())
    assert abs(s[1] - 2 / total) < 1e-9
    index.apply(B, [BlockRemoved([1])])  # evicted after completion: no stale promise left
    assert scorer.score(CycleState(), request(), pool.snapshot()) == [0.0, 0.0, 0.0]
    assert index.stats.holds == 1 and index.stats.holds_released == 1


def test_two_requests_same_prefix_hold_independently() -> None:
    clock = Clock()
    pool, index, scorer, _ = setup(clock, hold=True)
    body = json.dumps({"model": "m", "messages": MSGS}).encode()
    r1, r2 = (parse_request("/v1/chat/completions", body, request_id="dup") for _ in range(2))
    for r in (r1, r2):
        c = CycleState()
        scorer.score(c, r, pool.snapshot())
        scorer.pre_request(c, r, result_for(pool, A))
    scorer.on_complete(r1, Observation(r1.request_id, A, "m", 1, dispatch_ts=0.0))
    assert scorer.score(CycleState(), request(), pool.snapshot())[0] == 1.0  # r2 (same x-request-id) still holds
    scorer.on_complete(r2, Observation(r2.request_id, A, "m", 1, dispatch_ts=0.0))
    assert scorer.score(CycleState(), request(), pool.snapshot())[0] == 0.0


def test_fallback_to_approximate_index_without_tokenizer() -> None:
    pool, index, scorer, _ = setup()
    req = request("other")
    cycle = CycleState()
    assert scorer.score(cycle, req, pool.snapshot()) == [0.0, 0.0, 0.0]
    assert cycle.data["prefix_precise"] is False and req.prompt_token_ids is None
    scorer.pre_request(cycle, req, result_for(pool, C))
    s = scorer.score(CycleState(), request("other"), pool.snapshot())
    assert s[2] == 1.0 and s[0] == 0.0
    assert isinstance(scorer.approx_index, PrefixIndex)


def test_config_wires_shared_services(tiny_model_dir: Path) -> None:
    pool = EndpointPool(default_models=frozenset({"tiny"}))
    raw = {
        "plugins": [
            {
                "type": "precise-prefix-cache",
                "parameters": {
                    "tokenizers": {"tiny": {"kind": "hf", "path": str(tiny_model_dir)}},
                    "kvEvents": {"sources": {A: {"endpoint": "tcp://127.0.0.1:5557"}}},
                    "maxKeys": 1000,
                },
            },
            {"type": "prefix-cache-scorer"},
        ],
        "schedulingProfiles": [{"name": "d", "plugins": [{"pluginRef": "precise-prefix-cache", "weight": 3}, {"pluginRef": "prefix-cache-scorer"}]}],
    }
    services: dict[str, object] = {}
    cfg = build_config(raw, pool, services)
    sc = cfg.plugins["precise-prefix-cache"]
    assert isinstance(sc, PrecisePrefixCacheScorer)
    assert sc.index.max_keys == 1000
    assert isinstance(sc.events, KVEventManager) and set(sc.events.sources) == {A}
    # the fallback reuses the prefix-cache-scorer's index (one shared approximate index)
    assert sc.approx_index is cfg.plugins["prefix-cache-scorer"].index
    assert sc in cfg.scheduler.pre_request


def test_shipped_profile_loads() -> None:
    pool = EndpointPool()
    cfg = load_config("precise-prefix", pool)
    names = {ws.scorer.type_name: ws.weight for ws in cfg.scheduler.profiles["default"].scorers}
    assert names["precise-prefix-cache"] > 0 and "queue-scorer" in names and "kv-cache-utilization-scorer" in names
    sc = cfg.plugins["precise-prefix-cache"]
    assert sc.hold_in_flight and sc in cfg.scheduler.observers  # holds are released on completion
