"""The token-block index: keys from events, removal by engine hash, LRU bound, media, hybrid groups, spec TTL."""

from __future__ import annotations

from extproc.datalayer.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
from extproc.datalayer.kvindex import KVBlockIndex, block_keys

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stored(hashes: list[int], parent: int | None, tokens: list[int], **kw: object) -> BlockStored:
    return BlockStored(hashes, parent, tokens, BS, **kw)  # type: ignore[arg-type]


TOKENS = list(range(1000, 1016))  # 4 blocks of 4


def test_keys_are_chained_and_deterministic() -> None:
    k1 = block_keys(TOKENS, BS)
    assert len(k1) == 4 and k1 == block_keys(TOKENS + [1, 2], BS)  # partial tail ignored
    assert block_keys([9] + TOKENS[1:], BS)[1:] != k1[1:]  # a different first block changes every later key
    assert block_keys(TOKENS, BS, lora="a") != k1
    assert block_keys(TOKENS, BS, hash_seed="s") != k1


def test_stored_events_in_pieces_match_request_keys() -> None:
    idx = KVBlockIndex()
    # engine hashes are arbitrary; the second event chains on the first via the engine parent hash
    idx.apply("a", [stored([501, 502], None, TOKENS[:8])])
    idx.apply("a", [stored([503], 502, TOKENS[8:12])])
    keys = idx.keys_for(TOKENS, BS)
    assert idx.lookup(keys, ["a", "b"]) == {"a": 3, "b": 0}


def test_removal_by_engine_hash_breaks_the_prefix() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS)])
    keys = idx.keys_for(TOKENS, BS)
    idx.apply("a", [BlockRemoved([2])])
    assert idx.lookup(keys, ["a"]) == {"a": 1}
    idx.apply("a", [BlockRemoved([999])])
    assert idx.stats.unknown_removals == 1


def test_orphan_parent_is_skipped() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([7], 12345, TOKENS[4:8])])
    assert idx.stats.orphan_blocks == 1 and len(idx) == 0


def test_all_blocks_cleared_and_drop_pod() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2], None, TOKENS[:8])])
    idx.apply("b", [stored([9, 8], None, TOKENS[:8])])
    keys = idx.keys_for(TOKENS, BS)
    idx.apply("a", [AllBlocksCleared()])
    assert idx.lookup(keys, ["a", "b"]) == {"a": 0, "b": 2}
    assert idx.drop_pod("b") == 2
    assert len(idx) == 0 and "b" not in idx.pods()


def test_lru_bound_evicts_oldest_keys_and_their_engine_mappings() -> None:
    idx = KVBlockIndex(max_keys=3)
    idx.apply("a", [stored([1, 2], None, TOKENS[:8])])
    other = list(range(50, 58))
    idx.apply("a", [stored([3, 4], None, other)])
    assert len(idx) == 3 and idx.stats.evicted_keys == 1
    # the oldest key (first block of TOKENS) went: that prefix no longer matches at all
    assert idx.lookup(idx.keys_for(TOKENS, BS), ["a"]) == {"a": 0}
    assert idx.lookup(idx.keys_for(other, BS), ["a"]) == {"a": 2}
    # its engine hash mapping went too: removing it is an unknown removal
    idx.apply("a", [BlockRemoved([1])])
    assert idx.stats.unknown_removals == 1


def test_lookup_touches_keys_in_lru() -> None:
    idx = KVBlockIndex(max_keys=4)
    idx.apply("a", [stored([1, 2], None, TOKENS[:8])])
    idx.apply("a", [stored([3, 4], None, list(range(50, 58)))])
    idx.lookup(idx.keys_for(TOKENS, BS), ["a"])  # TOKENS' keys become most recent
    idx.apply("a", [stored([5], None, list(range(70, 74)))])
    assert idx.lookup(idx.keys_for(TOKENS, BS), ["a"]) == {"a": 2}
    assert idx.lookup(idx.keys_for(list(range(50, 58)), BS), ["a"]) == {"a": 0}


def test_media_gpu_and_cpu_tiers() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS, medium="GPU")])
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS, medium="CPU")])
    keys = idx.keys_for(TOKENS, BS)
    idx.apply("a", [BlockRemoved([3, 4], "GPU")])  # offloaded tail: still in CPU
    m = idx.match(keys, ["a"])["a"]
    assert (m.blocks, m.gpu_blocks) == (4, 2)
    idx.apply("a", [BlockRemoved([4], "CPU")])
    m = idx.match(keys, ["a"])["a"]
    assert (m.blocks, m.gpu_blocks) == (3, 2)


def test_full_attention_groups_all_required() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS, group_idx=0)])
    idx.apply("a", [stored([1, 2], None, TOKENS[:8], group_idx=1)])
    assert idx.lookup(idx.keys_for(TOKENS, BS), ["a"]) == {"a": 2}


def test_sliding_window_group_needs_only_last_window_blocks() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS, group_idx=0)])
    # window of 8 tokens = 2 blocks; the SW group evicted blocks 0 and 1 but holds 2 and 3
    idx.apply(
        "a",
        [stored([1, 2, 3, 4], None, TOKENS, group_idx=1, kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=8)],
    )
    idx.apply("a", [BlockRemoved([1, 2], "GPU", 1)])
    keys = idx.keys_for(TOKENS, BS)
    assert idx.lookup(keys, ["a"]) == {"a": 4}
    idx.apply("a", [BlockRemoved([4], "GPU", 1)])  # now the window before L=4 is incomplete; L=3 needs blocks 1,2
    assert idx.lookup(keys, ["a"]) == {"a": 0}


def test_mamba_group_needs_checkpoint_at_hit_length() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3, 4], None, TOKENS, group_idx=0)])
    idx.apply("a", [stored([1, 2, 3], None, TOKENS[:12], group_idx=1, kv_cache_spec_kind="mamba")])
    idx.apply("a", [BlockRemoved([1, 3], "GPU", 1)])  # mamba states kept only at block 2 (index 1)
    assert idx.lookup(idx.keys_for(TOKENS, BS), ["a"]) == {"a": 2}


def test_speculative_entries_expire_and_are_confirmed() -> None:
    clock = Clock()
    idx = KVBlockIndex(clock=clock)
    keys = idx.keys_for(TOKENS, BS)
    idx.add_speculative("a", keys, ttl_s=2.0)
    assert idx.lookup(keys, ["a", "b"]) == {"a": 4, "b": 0}
    clock.t += 2.5
    assert idx.lookup(keys, ["a"]) == {"a": 0}
    assert idx.stats.speculative_expired == 4
    # confirmation: a BlockStored replaces the speculative entry, which then never expires
    idx.add_speculative("a", keys, ttl_s=2.0)
    idx.apply("a", [stored([1, 2], None, TOKENS[:8])])
    assert idx.stats.speculative_confirmed == 2
    clock.t += 10
    assert idx.lookup(keys, ["a"]) == {"a": 2}
    assert idx.speculative_count("a") == 0


def test_in_flight_holds_are_counted_released_and_capped() -> None:
    clock = Clock()
    idx = KVBlockIndex(clock=clock)
    keys = idx.keys_for(TOKENS, BS)
    idx.hold("r1", "a", keys, max_s=60.0)
    idx.hold("r2", "a", keys[:2], max_s=60.0)
    clock.t += 30.0  # holds do not expire with the speculative TTL
    assert idx.lookup(keys, ["a", "b"]) == {"a": 4, "b": 0}
    assert idx.release("r1") and not idx.release("r1")
    assert idx.lookup(keys, ["a"]) == {"a": 2}  # r2 still holds its two blocks
    clock.t += 31.0  # r2 never completed: dropped at its cap
    assert idx.lookup(keys, ["a"]) == {"a": 0}
    assert idx.stats.holds_expired == 1 and idx.stats.holds_released == 1 and idx.holds_of("a") == 0


def test_drop_pod_releases_its_holds() -> None:
    idx = KVBlockIndex(clock=Clock())
    keys = idx.keys_for(TOKENS, BS)
    idx.hold("r1", "a", keys, max_s=60.0)
    idx.hold("r2", "b", keys, max_s=60.0)
    idx.drop_pod("a")
    assert idx.lookup(keys, ["a", "b"]) == {"a": 0, "b": 4}
    assert not idx.release("r1") and idx.release("r2")


def test_index_clock_can_be_replaced() -> None:
    """A virtual-time driver sets the clock: speculative TTLs then expire in its seconds, not wall seconds."""
    idx = KVBlockIndex()
    virtual = Clock()
    idx.clock = virtual
    keys = idx.keys_for(TOKENS, BS)
    idx.add_speculative("a", keys, ttl_s=2.0)
    assert idx.lookup(keys, ["a"]) == {"a": 4}
    virtual.t += 2.5
    assert idx.lookup(keys, ["a"]) == {"a": 0}
