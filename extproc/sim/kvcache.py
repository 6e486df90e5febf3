"""Paged KV cache with automatic prefix caching, as vLLM V1's block pool does it (pure, no I/O, no clock).

* ``num_blocks`` blocks of ``block_size`` tokens; a request holds a list of block ids.
* A block that becomes full of computed tokens gets a hash chained from its parent block's hash, its token ids
  and the LoRA name (xxh3-64, seeded per pod like vLLM's per-process hash seed) and is registered in the
  prefix-cache map. A later request whose leading full blocks hash the same reuses them (reference count + 1).
* Freed blocks keep their hash and go to the tail of an LRU free queue (a request's blocks are freed last-block
  first, so its tail is evicted before its head); allocation takes blocks from the head and evicts the hash of a
  cached block it reuses. Usage = 1 - free / total, like ``vllm:kv_cache_usage_perc``.
* Every store / evict is recorded as a KV event (BlockStored / BlockRemoved / AllBlocksCleared) for
  :mod:`extproc.sim.kvevents`; only full blocks are ever stored.

KV-cache groups (hybrid models), as vLLM's hybrid memory allocator does it (vllm/v1/core/kv_cache_coordinator.py,
single_type_kv_cache_manager.py, kv_cache_utils.py ``_get_kv_cache_groups_uniform_page_size``):

* ``groups`` lists the model's KV-cache groups (``KVGroupSpec``: ``full_attention`` or ``sliding_window`` with a
  window of W tokens); all groups share this one block pool, every request has one block table per group, and
  the prefix-cache map is keyed by (group, hash): the same block hash is cached once per group.
* A sliding-window group frees a request's blocks that fall out of the window (``remove_skipped``: blocks before
  ``(computed - W + 1) // block_size`` become null, ``-1``, and join the LRU tail; they stay cached until
  evicted), so it holds at most about W / block_size blocks + the current chunk per request.
* A prefix hit (``find_hit``) is the longest L valid in every group: a full-attention group needs blocks 0..L-1
  cached, a sliding-window group only the ``ceil((W - 1) / block_size)`` blocks before L (or all of 0..L-1 when L
  is shorter); the hit is iterated until every group agrees, as the coordinator does.
* Events carry ``group_idx``, the group's kind and window (vLLM's BlockStored / BlockRemoved fields), so a
  precise scorer can apply the same rule (extproc/datalayer/kvindex.py).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

__all__ = [
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "KVEvent",
    "KVCache",
    "KVGroupSpec",
    "FULL_ATTENTION",
    "SLIDING_WINDOW",
    "NULL_BLOCK",
    "hash_block",
]

FULL_ATTENTION = "full_attention"
SLIDING_WINDOW = "sliding_window"
NULL_BLOCK = -1  # a block-table slot a sliding-window group has freed (vLLM's null_block)


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """One KV-cache group: its attention kind, window (sliding_window only, tokens) and how many layers it holds."""

    kind: str = FULL_ATTENTION
    sliding_window: int | None = None
    layers: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (FULL_ATTENTION, SLIDING_WINDOW):
            raise ValueError(f"unsupported KV-cache group kind {self.kind!r} (full_attention or sliding_window)")
        if self.kind == SLIDING_WINDOW and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError("a sliding_window group needs sliding_window >= 1 (tokens)")

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> KVGroupSpec:
        unknown = set(d) - {"kind", "sliding_window", "layers"}
        if unknown:
            raise ValueError(f"unknown KV-cache group fields: {sorted(unknown)}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str = "GPU"
    group_idx: int = 0
    kind: str = FULL_ATTENTION
    sliding_window: int | None = None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_MASK63 = (1 << 63) - 1


def hash_block(parent: int | None, token_ids: Sequence[int], lora_name: str | None, seed: int) -> int:
    """Chained block hash: xxh3-64 of (parent hash, token ids, LoRA name), kept in signed-int64-safe range."""
    h = xxhash.xxh3_64(seed=seed)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(array("i", token_ids).tobytes())
    if lora_name:
        h.update(lora_name.encode("utf-8"))
    return h.intdigest() & _MASK63


class KVCache:
    """Block pool with prefix caching, reference counts, LRU eviction, KV-cache groups and KV-event recording.

    The single-group methods (``lookup``, ``touch``, ``allocate``, ``free``, ``cache_blocks``) act on group 0; the
    ``*_tables`` methods take a request's block tables (one list per group) and act on every group."""

    __slots__ = (
        "num_blocks",
        "block_size",
        "enable_prefix_caching",
        "hash_seed",
        "groups",
        "hybrid",
        "_sw",
        "_ref",
        "_hash",
        "_grp",
        "_cached_g",
        "_cached",
        "_free",
        "events",
        "record_events",
        "on_store",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        hash_seed: int = 0,
        record_events: bool = True,
        groups: Sequence[KVGroupSpec] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.record_events = record_events
        self.groups: tuple[KVGroupSpec, ...] = tuple(groups) if groups else (KVGroupSpec(),)
        self.hybrid = len(self.groups) > 1 or self.groups[0].kind != FULL_ATTENTION
        # per group: the window in tokens (0 = full attention)
        self._sw: tuple[int, ...] = tuple(
            (g.sliding_window or 0) if g.kind == SLIDING_WINDOW else 0 for g in self.groups
        )
        self._ref: list[int] = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._grp: list[int] = [0] * num_blocks
        self._cached_g: list[dict[int, int]] = [{} for _ in self.groups]
        self._cached: dict[int, int] = self._cached_g[0]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.events: list[KVEvent] = []
        # called with (block_hashes, parent_hash, token_ids, lora_id, lora_name) for blocks newly cached in group 0,
        # e.g. by the CPU offload tier (extproc.sim.offload), whether or not events are recorded
        self.on_store: Callable[[list[int], int | None, list[int], int | None, str | None], None] | None = None

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(c) for c in self._cached_g)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def is_cached(self, block_hash: int, group: int = 0) -> bool:
        return block_hash in self._cached_g[group]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def take_events(self) -> list[KVEvent]:
        ev = self.events
        self.events = []
        return ev

    def new_tables(self) -> list[list[int]]:
        """Empty block tables, one per group."""
        return [[] for _ in self.groups]

    # ---- hashing / lookup -----------------------------------------------------------------------------------
    def extend_hashes(self, hashes: list[int], token_ids: Sequence[int], lora_name: str | None) -> None:
        """Append the hashes of the full blocks of ``token_ids`` not yet in ``hashes``."""
        bs = self.block_size
        full = len(token_ids) // bs
        parent = hashes[-1] if hashes else None
        seed = self.hash_seed
        for i in range(len(hashes), full):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], lora_name, seed)
            hashes.append(parent)

    def lookup(self, hashes: Sequence[int], max_blocks: int, group: int = 0) -> list[int]:
        """Block ids of the longest consecutive cached prefix of ``hashes`` in ``group`` (at most ``max_blocks``)."""
        if not self.enable_prefix_caching:
            return []
        cached = self._cached_g[group]
        out: list[int] = []
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def _sw_hit(self, group: int, hashes: Sequence[int], upper: int) -> int:
        """Longest hit <= ``upper`` blocks a sliding-window group can serve: the last ``ceil((W - 1) / bs)`` blocks
        before it cached (SlidingWindowManager.find_longest_cache_hit: right-to-left scan), else the cached run
        from block 0."""
        need = -(-(self._sw[group] - 1) // self.block_size)
        if need <= 0:
            return upper
        cached = self._cached_g[group]
        run = 0
        for i in range(upper - 1, -1, -1):
            if hashes[i] in cached:
                run += 1
                if run >= need:
                    return i + run
            else:
                run = 0
        return run

    def find_hit(self, hashes: Sequence[int], max_blocks: int) -> tuple[int, list[list[int]]]:
        """The prefix hit (blocks) valid in every group and the hit's block tables (sliding-window groups: null
        before the window). Read-only: nothing is touched."""
        if not self.enable_prefix_caching or max_blocks <= 0:
            return 0, self.new_tables()
        if not self.hybrid:
            hits = self.lookup(hashes, max_blocks)
            return len(hits), [hits]
        sw = self._sw
        upper = min(max_blocks, len(hashes))
        for g, w in enumerate(sw):  # full-attention groups bound the hit with a consecutive walk
            if not w:
                upper = min(upper, len(self.lookup(hashes, upper, g)))
        while upper > 0:  # then every sliding-window group shrinks it until all agree
            lo = upper
            for g, w in enumerate(sw):
                if w:
                    lo = min(lo, self._sw_hit(g, hashes, lo))
            if lo == upper:
                break
            upper = lo
        tables: list[list[int]] = []
        bs = self.block_size
        for g, w in enumerate(sw):
            cached = self._cached_g[g]
            if w:
                start = max(0, upper - (-(-(w - 1) // bs)))
                tables.append([NULL_BLOCK] * start + [cached[h] for h in hashes[start:upper]])
            else:
                tables.append([cached[h] for h in hashes[:upper]])
        return upper, tables

    def num_evictable_in(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` currently sit in the free queue (a hit on them uses up free capacity)."""
        ref = self._ref
        return sum(1 for b in block_ids if b >= 0 and ref[b] == 0)

    def num_evictable_in_tables(self, tables: Sequence[Sequence[int]]) -> int:
        return sum(self.num_evictable_in(t) for t in tables)

    # ---- allocation -----------------------------------------------------------------------------------------
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); null slots are skipped."""
        ref = self._ref
        free = self._free
        for b in block_ids:
            if b < 0:
                continue
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def touch_tables(self, tables: Sequence[Sequence[int]]) -> None:
        for t in tables:
            self.touch(t)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks from the head of the free queue (evicting their cached hashes), or None if short."""
        if n > len(self._free):
            return None
        out: list[int] = []
        free = self._free
        ref = self._ref
        hashes = self._hash
        grp = self._grp
        cached_g = self._cached_g
        removed: dict[int, list[int]] | None = None
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                g = grp[b]
                cached = cached_g[g]
                if cached.get(h) == b:
                    del cached[h]
                    if removed is None:
                        removed = {}
                    removed.setdefault(g, []).append(h)
            ref[b] = 1
            out.append(b)
        if removed and self.record_events:
            for g, hs in removed.items():
                last = self.events[-1] if self.events else None
                if isinstance(last, BlockRemoved) and last.group_idx == g and last.medium == "GPU":
                    last.block_hashes.extend(hs)
                else:
                    self.events.append(BlockRemoved(hs, group_idx=g))
        return out

    def blocks_needed(self, tables: Sequence[Sequence[int]], upto: int) -> int:
        """New blocks every group needs for ``upto`` tokens (null slots count as held)."""
        n = -(-upto // self.block_size)
        return sum(max(0, n - len(t)) for t in tables)

    def allocate_tables(self, tables: list[list[int]], upto: int) -> bool:
        """Extend every group's table to hold ``upto`` tokens; all or nothing (False if the pool is short)."""
        n = -(-upto // self.block_size)
        need = sum(max(0, n - len(t)) for t in tables)
        if need == 0:
            return True
        if need > len(self._free):
            return False
        for t in tables:
            k = n - len(t)
            if k > 0:
                new = self.allocate(k)
                assert new is not None
                t.extend(new)
        return True

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; blocks reaching zero join the LRU tail, last block first."""
        ref = self._ref
        free = self._free
        for b in reversed(block_ids):
            if b < 0:
                continue
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def free_tables(self, tables: Sequence[Sequence[int]]) -> None:
        for t in tables:
            self.free(t)

    def remove_skipped(self, tables: list[list[int]], num_computed: int) -> None:
        """Sliding-window groups: free the blocks no longer inside the window of the next token (they become null
        slots and join the LRU tail, still cached until evicted), as SlidingWindowManager.remove_skipped_blocks."""
        bs = self.block_size
        ref = self._ref
        free = self._free
        for g, w in enumerate(self._sw):
            if not w:
                continue
            t = tables[g]
            first_useful = (num_computed - w + 1) // bs
            for i in range(min(first_useful, len(t)) - 1, -1, -1):
                b = t[i]
                if b < 0:
                    break  # everything before an earlier null slot was removed already
                t[i] = NULL_BLOCK
                ref[b] -= 1
                if ref[b] == 0:
                    free[b] = None

    def held_blocks(self, tables: Sequence[Sequence[int]]) -> int:
        """Non-null blocks of a request's tables."""
        return sum(1 for t in tables for b in t if b >= 0)

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Sequence[int],
        lora_id: int | None,
        lora_name: str | None,
        group: int = 0,
    ) -> None:
        """Register blocks ``start..end-1`` of a request (now full of computed tokens) in ``group``'s prefix cache."""
        if not self.enable_prefix_caching or end <= start:
            return
        cached = self._cached_g[group]
        bhash = self._hash
        grp = self._grp
        stored: list[int] = []
        for i in range(start, end):
            h = hashes[i]
            b = block_ids[i]
            if b < 0 or h in cached:
                continue  # a null slot, or the same content already cached in another block (or this one)
            cached[h] = b
            bhash[b] = h
            grp[b] = group
            stored.append(h)
        if stored and group == 0 and self.on_store is not None:
            bs = self.block_size
            self.on_store(list(hashes[start:end]), hashes[start - 1] if start > 0 else None,
                          list(token_ids[start * bs : end * bs]), lora_id, lora_name)
        if stored and self.record_events:
            bs = self.block_size
            parent = hashes[start - 1] if start > 0 else None
            spec = self.groups[group]
            self.events.append(
                BlockStored(
                    block_hashes=stored if len(stored) == end - start else list(hashes[start:end]),
                    parent_block_hash=parent,
                    token_ids=list(token_ids[start * bs : end * bs]),
                    block_size=bs,
                    lora_id=lora_id,
                    lora_name=lora_name,
                    group_idx=group,
                    kind=spec.kind,
                    sliding_window=spec.sliding_window if spec.kind == SLIDING_WINDOW else None,
                )
            )

    def cache_tables(
        self,
        tables: Sequence[Sequence[int]],
        hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Sequence[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        for g, t in enumerate(tables):
            self.cache_blocks(t, hashes, start, end, token_ids, lora_id, lora_name, g)

    def reset(self) -> None:
        """Drop every cached block (a restart or ``reset_prefix_cache``). Only valid with no live requests."""
        self._ref = [0] * self.num_blocks
        self._hash = [None] * self.num_blocks
        self._grp = [0] * self.num_blocks
        for c in self._cached_g:
            c.clear()
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        if self.record_events:
            self.events.append(AllBlocksCleared())
