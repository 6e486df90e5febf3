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
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

__all__ = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEvent", "KVCache", "hash_block"]


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str = "GPU"


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"


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
    """Block pool with prefix caching, reference counts, LRU eviction and KV-event recording."""

    __slots__ = (
        "num_blocks",
        "block_size",
        "enable_prefix_caching",
        "hash_seed",
        "_ref",
        "_hash",
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
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.record_events = record_events
        self._ref: list[int] = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.events: list[KVEvent] = []
        # called with (block_hashes, parent_hash, token_ids, lora_id, lora_name) for blocks newly cached, e.g. by
        # the CPU offload tier (extproc.sim.offload), whether or not events are recorded
        self.on_store: Callable[[list[int], int | None, list[int], int | None, str | None], None] | None = None

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._cached

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def take_events(self) -> list[KVEvent]:
        ev = self.events
        self.events = []
        return ev

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

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (at most ``max_blocks``)."""
        if not self.enable_prefix_caching:
            return []
        cached = self._cached
        out: list[int] = []
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_evictable_in(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` currently sit in the free queue (a hit on them uses up free capacity)."""
        ref = self._ref
        return sum(1 for b in block_ids if ref[b] == 0)

    # ---- allocation -----------------------------------------------------------------------------------------
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        ref = self._ref
        free = self._free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks from the head of the free queue (evicting their cached hashes), or None if short."""
        if n > len(self._free):
            return None
        out: list[int] = []
        free = self._free
        ref = self._ref
        hashes = self._hash
        removed: list[int] | None = None
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
                    if removed is None:
                        removed = []
                    removed.append(h)
            ref[b] = 1
            out.append(b)
        if removed and self.record_events:
            last = self.events[-1] if self.events else None
            if isinstance(last, BlockRemoved):
                last.block_hashes.extend(removed)
            else:
                self.events.append(BlockRemoved(removed))
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; blocks reaching zero join the LRU tail, last block first."""
        ref = self._ref
        free = self._free
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Sequence[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        """Register blocks ``start..end-1`` of a request (now full of computed tokens) in the prefix cache."""
        if not self.enable_prefix_caching or end <= start:
            return
        cached = self._cached
        bhash = self._hash
        stored: list[int] = []
        for i in range(start, end):
            h = hashes[i]
            b = block_ids[i]
            if h in cached:
                continue  # the same content is already cached in another block (or this one)
            cached[h] = b
            bhash[b] = h
            stored.append(h)
        if stored and self.on_store is not None:
            bs = self.block_size
            self.on_store(list(hashes[start:end]), hashes[start - 1] if start > 0 else None,
                          list(token_ids[start * bs : end * bs]), lora_id, lora_name)
        if stored and self.record_events:
            bs = self.block_size
            parent = hashes[start - 1] if start > 0 else None
            self.events.append(
                BlockStored(
                    block_hashes=stored if len(stored) == end - start else list(hashes[start:end]),
                    parent_block_hash=parent,
                    token_ids=list(token_ids[start * bs : end * bs]),
                    block_size=bs,
                    lora_id=lora_id,
                    lora_name=lora_name,
                )
            )

    def reset(self) -> None:
        """Drop every cached block (a restart or ``reset_prefix_cache``). Only valid with no live requests."""
        self._ref = [0] * self.num_blocks
        self._hash = [None] * self.num_blocks
        self._cached.clear()
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        if self.record_events:
            self.events.append(AllBlocksCleared())
