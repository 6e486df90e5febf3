from __future__ import annotations

import pytest

from extproc.datalayer.endpoint import EndpointPool
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.prefix import (
    CYCLE_MATCHED,
    CYCLE_SCORES,
    SERVICE_KEY,
    PrefixCacheScorer,
    PrefixIndex,
    hash_prompt,
)
from extproc.scheduling.registry import PluginContext

from plugin_testlib import MODEL, make_endpoint, make_request, result_for

BLOCK = "0123456789abcdef" * 4  # exactly 64 bytes


def test_hash_prompt_blocks_chain_and_model_seed() -> None:
    text = BLOCK * 3 + "tail"  # partial trailing block is ignored
    h = hash_prompt(text, MODEL)
    assert len(h) == 3
    assert len(set(h)) == 3  # same content, different position → different hash (chained)
    assert hash_prompt(BLOCK * 2, MODEL) == h[:2]  # a prefix of the prompt has a prefix of the hashes
    assert hash_prompt(text, "other-model")[0] != h[0]
    assert hash_prompt("short", MODEL) == []
    assert len(hash_prompt(BLOCK * 10, MODEL, max_blocks=4)) == 4
    assert len(hash_prompt(BLOCK * 3, MODEL, block_size=32)) == 6


def test_hash_prompt_multibyte_text_is_cut_by_bytes() -> None:
    text = "é" * 64  # 128 UTF-8 bytes
    assert len(hash_prompt(text, MODEL)) == 2
    assert len(hash_prompt(text, MODEL, max_blocks=1)) == 1


def test_index_match_counts_consecutive_leading_blocks() -> None:
    idx = PrefixIndex(100)
    a, b, c = hash_prompt(BLOCK * 4, MODEL), hash_prompt(BLOCK * 2, MODEL), hash_prompt("x" * 64 + BLOCK * 3, MODEL)
    idx.add(a, "pod-a")
    idx.add(b, "pod-b")
    idx.add(c, "pod-c")
    assert idx.match(a) == {"pod-a": 4, "pod-b": 2}
    assert idx.match(c) == {"pod-c": 4}
    assert idx.match([]) == {}
    assert idx.match(hash_prompt("zz" * 64, MODEL)) == {}


def test_index_gap_ends_the_match() -> None:
    idx = PrefixIndex(100)
    h = hash_prompt(BLOCK * 4, MODEL)
    idx.add([h[0], h[1], h[3]], "pod")  # block 2 missing
    assert idx.match(h) == {"pod": 2}


def test_index_lru_bound_evicts_oldest_and_tail_first() -> None:
    idx = PrefixIndex(4)
    old = hash_prompt("o" * 64 * 3, MODEL)
    new = hash_prompt("n" * 64 * 3, MODEL)
    idx.add(old, "pod")
    idx.add(new, "pod")
    assert idx.blocks_of("pod") == 4
    # The newer prompt is whole; of the older one only its head block survives (tail evicted first).
    assert idx.match(new) == {"pod": 3}
    assert idx.match(old) == {"pod": 1}
    assert idx.stats()["blocks_indexed"] == 4
    # A prompt longer than the capacity keeps its leading blocks.
    long = hash_prompt("L" * 64 * 10, MODEL)
    idx.add(long, "pod")
    assert idx.match(long) == {"pod": 4}
    assert idx.match(new) == {}


def test_index_set_capacity_shrinks_pod() -> None:
    idx = PrefixIndex(100)
    idx.add(hash_prompt(BLOCK * 10, MODEL), "pod")
    idx.set_capacity("pod", 3)
    assert idx.blocks_of("pod") == 3
    assert idx.capacity_of("pod") == 3
    assert idx.capacity_of("other") == 100
    with pytest.raises(ValueError):
        idx.set_capacity("pod", 0)


def test_scorer_scores_and_cycle_outputs(ctx: PluginContext) -> None:
    scorer = PrefixCacheScorer.from_config("prefix", {}, ctx)
    eps = [make_endpoint(i) for i in range(3)]
    warm = make_request(BLOCK * 4)
    c1 = CycleState()
    assert scorer.score(c1, warm, eps) == [0.0, 0.0, 0.0]
    assert c1.data[CYCLE_SCORES] == {e.address: 0.0 for e in eps}
    scorer.pre_request(c1, warm, result_for(eps[1]))

    # Same first 2 of 4 blocks → 0.5 on the pod that served the earlier request.
    req = make_request(BLOCK * 2 + "Z" * 128)
    c2 = CycleState()
    assert scorer.score(c2, req, eps) == pytest.approx([0.0, 0.5, 0.0])
    assert c2.data[CYCLE_SCORES] == {eps[0].address: 0.0, eps[1].address: 0.5, eps[2].address: 0.0}
    assert c2.data[CYCLE_MATCHED] == {eps[1].address: 2}
    assert c2.data["prefix_total_blocks"] == 4

    # Identical prompt → 1.0; a different model never matches.
    assert scorer.score(CycleState(), make_request(BLOCK * 4), eps) == [0.0, 1.0, 0.0]
    assert scorer.score(CycleState(), make_request(BLOCK * 4, model="other"), eps) == [0.0, 0.0, 0.0]
    # Shorter than one block: no blocks, all zero.
    assert scorer.score(CycleState(), make_request("hi"), eps) == [0.0, 0.0, 0.0]


def test_hashes_are_computed_once_per_cycle(ctx: PluginContext, monkeypatch: pytest.MonkeyPatch) -> None:
    import extproc.scheduling.plugins.prefix as prefix_mod

    calls = []
    real = prefix_mod.hash_prompt

    def counting(*a: object, **k: object) -> list[int]:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(prefix_mod, "hash_prompt", counting)
    scorer = PrefixCacheScorer.from_config("prefix", {}, ctx)
    eps = [make_endpoint(0)]
    cyc = CycleState()
    req = make_request(BLOCK * 2)
    scorer.score(cyc, req, eps)
    scorer.score(cyc, req, eps)
    scorer.pre_request(cyc, req, result_for(eps[0]))
    assert len(calls) == 1


def test_stats_count_dispatches_and_hits(ctx: PluginContext) -> None:
    scorer = PrefixCacheScorer.from_config("prefix", {}, ctx)
    ep = make_endpoint(0)
    for _ in range(3):
        cyc = CycleState()
        req = make_request(BLOCK * 2)
        scorer.score(cyc, req, [ep])
        scorer.pre_request(cyc, req, result_for(ep))
    assert scorer.index.stats() == {"lookups": 3, "hits": 2, "blocks_indexed": 2}


def test_index_is_shared_and_drops_removed_pods() -> None:
    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints(["10.0.0.1:8000", "10.0.0.2:8000"])
    ctx = PluginContext(pool=pool)
    s1 = PrefixCacheScorer.from_config("p1", {}, ctx)
    s2 = PrefixCacheScorer.from_config("p2", {}, ctx)
    assert s1.index is s2.index is ctx.services[SERVICE_KEY]
    a, b = pool.snapshot()
    for ep in (a, b):
        cyc = CycleState()
        req = make_request(BLOCK * 3)
        s1.score(cyc, req, [a, b])
        s1.pre_request(cyc, req, result_for(ep))
    assert set(s1.index.pods()) == {a.address, b.address}
    pool.set_endpoints(["10.0.0.2:8000"])
    assert s1.index.pods() == [b.address]
    assert s1.index.match(hash_prompt(BLOCK * 3, MODEL)) == {b.address: 3}
    # A removed endpoint that is still dispatched to (race) is not re-indexed.
    cyc = CycleState()
    req = make_request(BLOCK * 3)
    s1.score(cyc, req, [a])
    s1.pre_request(cyc, req, result_for(a))
    assert a.address not in s1.index.pods()


def test_auto_tune_sizes_from_cache_config(ctx: PluginContext) -> None:
    scorer = PrefixCacheScorer.from_config("prefix", {"autoTune": True, "lruCapacityPerServer": 2}, ctx)
    big = make_endpoint(0, num_gpu_blocks=4, block_size=16)  # 64 tokens × 4 chars / 64 = 4 hash blocks
    small = make_endpoint(1)  # no cache_config_info → parameter default (2)
    for ep in (big, small):
        cyc = CycleState()
        req = make_request(BLOCK * 8)
        scorer.score(cyc, req, [ep])
        scorer.pre_request(cyc, req, result_for(ep))
    assert scorer.index.blocks_of(big.address) == 4
    assert scorer.index.blocks_of(small.address) == 2


@pytest.mark.parametrize(
    "params, err",
    [
        ({"blockSize": 0}, "blockSize"),
        ({"maxPrefixBlocksToMatch": -1}, "maxPrefixBlocksToMatch"),
        ({"lruCapacityPerServer": "big"}, "lruCapacityPerServer"),
        ({"autoTune": 1}, "autoTune"),
        ({"blockSize": 64, "hashBlockSize": 64}, "not both"),
        ({"blocksize": 64}, "unknown parameter"),
    ],
)
def test_bad_parameters(ctx: PluginContext, params: dict[str, object], err: str) -> None:
    with pytest.raises((ValueError, TypeError), match=err):
        PrefixCacheScorer.from_config("prefix", params, ctx)


def test_gie_parameter_alias(ctx: PluginContext) -> None:
    s = PrefixCacheScorer.from_config("prefix", {"hashBlockSize": 32, "maxPrefixBlocksToMatch": 8}, ctx)
    assert (s.block_size, s.max_blocks) == (32, 8)


def test_bounded_load_drops_affinity_of_an_overloaded_pod_only() -> None:
    a, b, c = make_endpoint("10.0.0.1:8000"), make_endpoint("10.0.0.2:8000"), make_endpoint("10.0.0.3:8000")
    scorer = PrefixCacheScorer(load_factor=1.5, load_slack=2.0)
    req = make_request(BLOCK * 4)
    scorer.pre_request(CycleState(), req, result_for(a))
    scorer.pre_request(CycleState(), req, result_for(b))
    a.inflight, b.inflight, c.inflight = 3, 1, 1  # mean 5/3 → cap 1.5 × 5/3 + 2 = 4.5
    cycle = CycleState()
    assert scorer.score(cycle, req, [a, b, c]) == [1.0, 1.0, 0.0]
    a.inflight = 9  # mean 11/3 → cap 7.5: a is over it
    cycle = CycleState()
    assert scorer.score(cycle, req, [a, b, c]) == [0.0, 1.0, 0.0]
    assert cycle.data[CYCLE_SCORES][a.address] == 1.0  # the cycle keeps the real cache state (predictor features)
    off = PrefixCacheScorer(index=scorer.index)  # boundedLoadFactor 0: off, the default
    assert off.score(CycleState(), req, [a, b, c]) == [1.0, 1.0, 0.0]
