"""Hybrid models in the simulator's KV cache: vLLM's KV-cache groups (full attention + sliding window), window
freeing, the prefix hit valid in every group, per-group KV events, and the precise index agreeing with the engine."""

from __future__ import annotations

import random

import pytest

import msgpack

from extproc.datalayer.kvevents import decode_payload
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.sim.engine import Engine, SimRequest
from extproc.sim.kvcache import NULL_BLOCK, BlockRemoved, BlockStored, KVCache, KVGroupSpec
from extproc.sim.kvevents import encode_batch, encode_event
from extproc.sim.profiles import Profile
from extproc.sim.roofline import get_architecture, get_gpu, kv_blocks_for, kv_cache_groups, roofline_profile

BS = 4
FULL = KVGroupSpec()
SW8 = KVGroupSpec("sliding_window", 8)  # 8-token window: a hit needs the ceil(7 / 4) = 2 blocks before its end


def _profile(groups: list[dict[str, object]] | None, **kw: object) -> Profile:
    base = Profile(
        name="h", model="m", accelerator="x", b0_ms=10.0, b1_ms=0.5, b2_ms=1.0, a0_ms=0.0, max_num_seqs=8,
        max_num_batched_tokens=64, num_gpu_blocks=64, block_size=BS, max_model_len=256, kv_cache_groups=groups,
    )
    return base.replace(**kw)


HYBRID = [{"kind": "full_attention", "layers": 2}, {"kind": "sliding_window", "sliding_window": 8, "layers": 2}]


def _drain(eng: Engine, now: float = 0.0) -> tuple[list[object], float]:
    events: list[object] = []
    for _ in range(10_000):
        if not eng.has_work():
            break
        r = eng.step(now)
        now += r.duration_s
        events.extend(r.kv_events)
    assert not eng.has_work()
    return events, now


# ---- the architecture table and vLLM's grouping ---------------------------------------------------------------


def test_groups_follow_vllm_uniform_page_size_rule() -> None:
    oss = kv_cache_groups(get_architecture("gpt-oss-20b"))
    assert [(g["kind"], g["sliding_window"], g["layers"]) for g in oss] == [
        ("full_attention", None, 12), ("sliding_window", 128, 12)]
    # Gemma-3-27B: 10 global + 52 local layers -> group size 10: 1 full group, 6 sliding ones (the last padded)
    g3 = kv_cache_groups(get_architecture("Gemma-3-27b"))
    assert [g["kind"] for g in g3] == ["full_attention"] + ["sliding_window"] * 6
    assert [g["layers"] for g in g3] == [10, 10, 10, 10, 10, 10, 2]
    assert {g["sliding_window"] for g in g3[1:]} == {1024}
    # every layer slides: one sliding-window group
    assert kv_cache_groups(get_architecture("Mistral-7B-v0.1")) == [
        {"kind": "sliding_window", "sliding_window": 4096, "layers": 32}]
    assert kv_cache_groups(get_architecture("Llama-3-8B")) == [{"kind": "full_attention", "sliding_window": None, "layers": 32}]
    # --disable-hybrid-kv-cache-manager: one full-attention group of every layer
    assert kv_cache_groups(get_architecture("gpt-oss-20b"), hybrid=False) == [
        {"kind": "full_attention", "sliding_window": None, "layers": 24}]


def test_attention_pattern_agrees_with_sliding_layers() -> None:
    for name in ("gpt-oss-20b", "gpt-oss-120b", "Gemma-2-9b", "Gemma-2-27b", "Gemma-3-12b", "Gemma-3-27b"):
        a = get_architecture(name)
        kinds = a.layer_kinds()
        assert kinds.count("sliding") == a.sliding_layers > 0 and kinds.count("full") > 0
    g3 = get_architecture("Gemma-3-27b").layer_kinds()
    assert [i for i, k in enumerate(g3) if k == "full"] == list(range(5, 62, 6))  # layers 5, 11, ..., 59
    with pytest.raises(ValueError, match="attention_pattern"):
        get_architecture({"name": "bad", "layers": 4, "hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128,
                          "vocab": 100, "sliding_window": 8, "sliding_layers": 1, "attention_pattern": ["sliding", "full"]})


def test_hybrid_blocks_hold_one_group_of_layers() -> None:
    h100 = get_gpu("H100")
    a = get_architecture("gpt-oss-20b")
    # a block of the shared pool holds one group (12 layers) instead of all 24: twice the blocks
    assert kv_blocks_for(a, h100, 1, hybrid=True) == pytest.approx(2 * kv_blocks_for(a, h100, 1), abs=1)
    prof = roofline_profile("gpt-oss-20b", "H100", 1)
    assert prof.kv_cache_groups == kv_cache_groups(a) and prof.num_gpu_blocks == kv_blocks_for(a, h100, 1, hybrid=True)
    assert roofline_profile("gpt-oss-20b", "H100", 1, hybrid_kv_cache=False).kv_cache_groups is None
    assert roofline_profile("Llama-3-8B", "H100", 1).kv_cache_groups is None  # no sliding layers: unchanged
    # the profile round-trips through YAML with its groups
    assert Profile.from_dict(prof.to_dict()).kv_cache_groups == prof.kv_cache_groups


# ---- the cache: window freeing, prefix hits limited by the window ---------------------------------------------


def _fill(kv: KVCache, tokens: list[int]) -> tuple[list[int], list[list[int]]]:
    hashes: list[int] = []
    kv.extend_hashes(hashes, tokens, None)
    tables = kv.new_tables()
    assert kv.allocate_tables(tables, len(tokens))
    kv.cache_tables(tables, hashes, 0, len(hashes), tokens, None, None)
    return hashes, tables


def test_sliding_window_frees_blocks_outside_the_window_and_keeps_them_cached() -> None:
    kv = KVCache(32, BS, groups=[FULL, SW8])
    tokens = list(range(1, 25))  # 6 blocks
    hashes, tables = _fill(kv, tokens)
    assert kv.num_free_blocks == 32 - 12
    kv.remove_skipped(tables, 24)  # the next token (24) sees tokens 17..24: blocks 0..3 are out of the window
    assert tables[0] == tables[0][:6] and NULL_BLOCK not in tables[0]
    assert tables[1][:4] == [NULL_BLOCK] * 4 and NULL_BLOCK not in tables[1][4:]
    assert kv.held_blocks(tables) == 6 + 2 and kv.num_free_blocks == 32 - 8
    # freed, not forgotten: until evicted they still give a hit
    assert all(kv.is_cached(h, 1) for h in hashes)
    assert kv.find_hit(hashes, 6)[0] == 6
    kv.remove_skipped(tables, 24)  # idempotent
    assert kv.num_free_blocks == 32 - 8
    kv.free_tables(tables)
    assert kv.num_free_blocks == 32


def test_prefix_hit_is_limited_by_the_window_in_the_sliding_group() -> None:
    kv = KVCache(64, BS, groups=[FULL, SW8])
    tokens = list(range(1, 25))
    hashes, tables = _fill(kv, tokens)
    kv.free_tables(tables)  # all 12 blocks cached and evictable; LRU order: last block first
    n, hit = kv.find_hit(hashes, 6)
    assert n == 6
    assert hit[0] == tables[0][:6]
    assert hit[1] == [NULL_BLOCK] * 4 + tables[1][4:6]  # only the window before the hit's end is taken
    # evicting a sliding-window block OUTSIDE that window changes nothing ...
    kv._cached_g[1].pop(hashes[1])
    assert kv.find_hit(hashes, 6)[0] == 6
    # ... evicting one INSIDE it moves the hit back to the last place with two cached blocks before it
    kv._cached_g[1].pop(hashes[4])
    assert kv.find_hit(hashes, 6)[0] == 4 - 0  # blocks 2, 3 are cached: L = 4
    kv._cached_g[1].pop(hashes[2])
    # no two consecutive SW blocks before any L <= 6 except (hashes[5] alone): only the cached run from block 0
    assert kv.find_hit(hashes, 6)[0] == 1
    # the full-attention group bounds it too
    kv._cached_g[0].pop(hashes[0])
    assert kv.find_hit(hashes, 6)[0] == 0


def test_hit_needs_cdiv_window_minus_one_blocks() -> None:
    # window 9, block 4: cdiv(8, 4) = 2 blocks before the end suffice (not ceil(9 / 4) = 3)
    kv = KVCache(64, BS, groups=[KVGroupSpec("sliding_window", 9)])
    tokens = list(range(1, 25))
    hashes, tables = _fill(kv, tokens)
    kv.free_tables(tables)
    for i in range(4):
        kv._cached_g[0].pop(hashes[i])
    assert kv.find_hit(hashes, 6)[0] == 6
    idx = KVBlockIndex()  # the precise index applies the same rule to the same events, off the wire
    raw = [encode_event(BlockStored(hashes, None, tokens, BS, None, None, group_idx=0, kind="sliding_window",
                                    sliding_window=9)),
           encode_event(BlockRemoved(hashes[:4], group_idx=0))]
    idx.apply("p", decode_payload(msgpack.packb([0.0, raw, 0])).events)
    assert idx.lookup(idx.keys_for(tokens, BS), ["p"]) == {"p": 6}


# ---- the engine -----------------------------------------------------------------------------------------------


def test_engine_sliding_group_holds_at_most_the_window_per_request() -> None:
    eng = Engine(_profile(HYBRID), seed=1)
    prompt = list(range(1000, 1040))  # 10 blocks
    eng.add_request(SimRequest("r", prompt, max_tokens=20))
    now = 0.0
    seen = 0
    while eng.has_work():
        r = eng.step(now)
        now += r.duration_s
        seq = eng._seqs.get("r")
        if seq is not None and seq.tables and seq.num_computed > 40:  # freed when next scheduled, as vLLM
            # full group: every block of the context; sliding group: the window's 2-3 blocks (+ the next one)
            full_blocks = -(-seq.num_computed // BS)
            assert len(seq.tables[0]) == full_blocks and NULL_BLOCK not in seq.tables[0]
            assert len([b for b in seq.tables[1] if b >= 0]) <= 4
            seen += 1
    assert seen >= 15
    assert eng.stats.generation_tokens_total == 20
    assert eng.kv.num_free_blocks == 64


def test_engine_hybrid_prefix_hit_and_events_per_group() -> None:
    eng = Engine(_profile(HYBRID), seed=3)
    shared = list(range(500, 532))  # 8 blocks of shared prefix
    eng.add_request(SimRequest("a", shared + [1, 2, 3, 4, 5], max_tokens=4))
    ev, now = _drain(eng)
    stored = [e for e in ev if isinstance(e, BlockStored)]
    assert {(e.group_idx, e.kind, e.sliding_window) for e in stored} == {(0, "full_attention", None),
                                                                         (1, "sliding_window", 8)}
    # both groups store the same block hashes (the group is not part of the hash)
    h0 = [h for e in stored if e.group_idx == 0 for h in e.block_hashes]
    h1 = [h for e in stored if e.group_idx == 1 for h in e.block_hashes]
    assert h0 == h1 and len(h0) == 10  # 37 prompt + 3 generated tokens computed
    m = encode_event(stored[-1])
    assert m["group_idx"] == 1 and m["kv_cache_spec_kind"] == "sliding_window" and m["kv_cache_spec_sliding_window"] == 8
    arr = encode_event(stored[-1], array_encoding=True)
    assert arr[9:] == [1, "sliding_window", 8]
    # a second request with the same prefix hits 8 blocks in both groups
    b = shared + [9, 9, 9, 9, 9]
    assert eng.cached_prefix_tokens(b) == 32
    eng.add_request(SimRequest("b", b, max_tokens=2))
    _drain(eng, now)
    assert eng.stats.prefix_cache_hits == 32


def test_cpu_tier_with_hybrid_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="CPU offload"):
        Engine(_profile(HYBRID, cpu_offload_blocks=10, cpu_load_ms_per_block=0.1))


def test_precise_index_agrees_with_the_hybrid_engine_under_evictions() -> None:
    """Events through the wire format into the precise index: its hit length per prompt equals the engine's."""
    groups = [{"kind": "full_attention", "layers": 1}, {"kind": "sliding_window", "sliding_window": 10, "layers": 1},
              {"kind": "sliding_window", "sliding_window": 9, "layers": 1}]
    eng = Engine(_profile(groups, num_gpu_blocks=90, max_num_batched_tokens=32), seed=5)
    idx = KVBlockIndex()
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 30000) for _ in range(rng.randrange(8, 40))] for _ in range(12)]
    now = 0.0
    checked = partial = 0
    for i in range(150):
        p = prefixes[rng.randrange(len(prefixes))] + [rng.randrange(1, 30000) for _ in range(rng.randrange(1, 12))]
        eng.add_request(SimRequest(f"r{i}", p, max_tokens=rng.randrange(1, 10)))
        for _ in range(rng.randrange(1, 4)):
            if not eng.has_work():
                break
            r = eng.step(now)
            now += r.duration_s
            if r.kv_events:
                idx.apply("pod", decode_payload(encode_batch(r.kv_events, now)).events)
        for q in prefixes:
            prompt = q + [7]
            want = eng.cached_prefix_tokens(prompt) // BS
            keys = idx.keys_for(prompt, BS)[: (len(prompt) - 1) // BS]  # the engine never hits the last token
            got = idx.lookup(keys, ["pod"])["pod"]
            assert got == want, (i, q[:3])
            checked += 1
            partial += 0 < want < len(q) // BS
    _drain(eng, now)
    assert checked == 150 * 12
    removed = [e for e in eng.kv.take_events() if isinstance(e, BlockRemoved)]
    assert idx.stats.removed_blocks > 0 and removed == []  # evictions happened and were all applied
    assert partial > 0  # some hits were cut short by an evicted block (window or full group)


def test_shipped_hybrid_profile_runs_precise_routing_in_virtual_time() -> None:
    """The shipped gpt-oss-20b hybrid profile through the virtual bench with precise routing: per-group events
    reach the index, every request completes, and the index holds no block an engine no longer caches."""
    from pathlib import Path

    from extproc.bench import virtual
    from extproc.bench.setups import SETUPS
    from extproc.bench.workloads import Stage, generate
    from extproc.sim import engine as engine_mod

    root = Path(__file__).resolve().parents[3]
    hybrid = root / "models/sim-profiles/gpt-oss-20b-h100-hybrid.yaml"
    prof = Profile.from_yaml(hybrid)
    assert prof.kv_cache_groups == kv_cache_groups(get_architecture("gpt-oss-20b"))
    assert Profile.from_yaml(root / "models/sim-profiles/gpt-oss-20b-h100-nohybrid.yaml").kv_cache_groups is None
    engines: list[Engine] = []
    real_init = engine_mod.Engine.__init__

    def init(self: Engine, *a: object, **kw: object) -> None:
        real_init(self, *a, **kw)  # type: ignore[arg-type]
        engines.append(self)

    indexes: list[KVBlockIndex] = []
    real_feed = virtual._feed_kv_events

    def feed(plugins: dict[str, object], clock: object) -> object:
        out = real_feed(plugins, clock)  # type: ignore[arg-type]
        indexes.extend(p.index for p in plugins.values() if isinstance(getattr(p, "index", None), KVBlockIndex))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(engine_mod.Engine, "__init__", init)
    mp.setattr(virtual, "_feed_kv_events", feed)
    try:
        wl = generate("shared-prefix", [Stage(20.0, 2.0)], seed=0)
        fl = virtual.layout(f"{hybrid}:2", kv_blocks=500)  # tight: windows get evicted
        res = virtual.run_virtual(wl, SETUPS["extproc-precise"], fl, seed=0)
    finally:
        mp.undo()
    assert len(res.results) == len(wl.requests) and all(r.ok for r in res.results)
    assert len(engines) == 2 and all(e.kv.num_groups == 2 for e in engines)
    assert sum(e.stats.prefix_cache_hits for e in engines) > 0
    (index,) = indexes
    assert index.stats.removed_blocks > 0
    for (_, addr), eng in zip(fl.pods, engines):
        st = index._pods[addr]
        assert set(st.groups) == {0, 1} and st.groups[1].kind == "sliding_window" and st.groups[1].sliding_window == 128
        cached = set().union(*(set(c) for c in eng.kv._cached_g))
        assert set(st.engine_to_key) <= cached  # every per-group eviction applied: nothing stale
