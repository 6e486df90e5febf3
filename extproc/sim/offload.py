"""A CPU KV-offload tier for the simulated engine, after vLLM's OffloadingConnector with its CPU backend.

* Write-through: every block the GPU cache stores (a full block of computed tokens, with its hash) is copied to
  a CPU block pool of ``capacity`` blocks, LRU-evicted. So blocks evicted from the GPU stay in CPU memory as
  long as the CPU pool keeps them.
* A new request whose leading blocks miss on the GPU but continue in the CPU pool loads those blocks back
  instead of recomputing them: they count as computed tokens, take fresh GPU blocks (and become GPU-cached
  again), and cost ``load_s_per_block`` each on the step that admits the request (PCIe transfer: KV bytes of a
  block / host-to-device bandwidth).
* KV events: ``BlockStored`` / ``BlockRemoved`` with ``medium: "CPU"`` for the CPU pool, next to the GPU
  pool's ``medium: "GPU"`` events, as vLLM publishes for offloaded blocks; a tier-aware precise-prefix scorer
  can then count CPU-resident blocks at a discount (``cpuTierWeight``).

Enabled by a profile's ``cpu_offload_blocks`` (> 0) and ``cpu_load_ms_per_block``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from extproc.sim.kvcache import BlockRemoved, BlockStored, KVEvent

__all__ = ["MEDIUM_CPU", "CPUOffloadTier"]

MEDIUM_CPU = "CPU"


class CPUOffloadTier:
    """LRU pool of block hashes held in CPU memory (content is implied by the hash, as in the GPU pool)."""

    __slots__ = ("capacity", "block_size", "load_s_per_block", "record_events", "_blocks", "events",
                 "blocks_loaded", "blocks_stored")

    def __init__(self, capacity: int, block_size: int, load_s_per_block: float, *, record_events: bool = True) -> None:
        if capacity <= 0 or block_size <= 0:
            raise ValueError("capacity and block_size must be > 0")
        if load_s_per_block < 0:
            raise ValueError("load_s_per_block must be >= 0")
        self.capacity = capacity
        self.block_size = block_size
        self.load_s_per_block = load_s_per_block
        self.record_events = record_events
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.events: list[KVEvent] = []
        self.blocks_loaded = 0
        self.blocks_stored = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def store(
        self,
        block_hashes: Sequence[int],
        parent: int | None,
        token_ids: Sequence[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        """Copy blocks the GPU just cached (hashes in chain order, their tokens) into the CPU pool."""
        blocks = self._blocks
        new = 0
        for h in block_hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
                new += 1
        if not new:
            return
        self.blocks_stored += new
        removed: list[int] = []
        while len(blocks) > self.capacity:
            h, _ = blocks.popitem(last=False)
            removed.append(h)
        if self.record_events:
            self.events.append(BlockStored(list(block_hashes), parent, list(token_ids), self.block_size, lora_id,
                                           lora_name, medium=MEDIUM_CPU))
            if removed:
                self.events.append(BlockRemoved(removed, medium=MEDIUM_CPU))

    def match(self, hashes: Sequence[int], start: int, max_blocks: int) -> int:
        """How many blocks of ``hashes[start:max_blocks]`` continue the prefix in the CPU pool (touched in LRU)."""
        blocks = self._blocks
        n = 0
        for h in hashes[start:max_blocks]:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            n += 1
        return n

    def take_events(self) -> list[KVEvent]:
        ev = self.events
        self.events = []
        return ev

    def reset(self) -> None:
        """A restart loses CPU memory too (the GPU pool's AllBlocksCleared covers every medium)."""
        self._blocks.clear()
