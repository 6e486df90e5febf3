"""``burst-prefix-cache``: co-locate bursts of requests that share a prompt (e.g. the n samples of an RL rollout
group) so the shared prefix is prefilled once. Runs for llm-d's ``prefix-cache-scorer`` that names a
``burst-prefix-cache-producer``.

Reference: llm-d-router pkg/epp/framework/plugins/requestcontrol/dataproducer/burstprefix. The reference holds every
request up to ``windowDurationMs`` and places the window's batch jointly. Here placement is **online**, with no
added latency: requests whose prompts hash to the same prefix blocks (``blockSizeTokens`` × 4 characters, up to
``maxPrefixTokensToMatch``) within the last ``windowDurationMs`` form a group; the first one is placed by the
other scorers, each later one scores 1.0 on the group's current replica until it holds ``maxPerReplica`` (−1 =
unlimited) of the group, then the group spills to the least loaded candidate it does not use yet (by window
assignments, ``balanceBy: requests``, or in-flight tokens, ``tokens``). With ``minColocateBlocks`` > 0 a request
sharing at least that many leading blocks with a placed group joins that group's replica while the replica holds
no more than its fair share of the window. A request that overlaps nothing scores 0 everywhere (no affinity).
``maxBatchSize`` bounds the window's memory (oldest entries dropped; the reference rejects instead).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.api import CHARS_PER_TOKEN
from extproc.plugin import (
    CycleKey,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_choice,
    get_int,
    register,
)
from extproc.scheduling.plugins.prefix import hash_prompt

_STATE: CycleKey[tuple[tuple[int, ...], str | None]] = CycleKey("burst_prefix_state")


@register
class BurstPrefixCacheScorer:
    type_name: ClassVar[str] = "burst-prefix-cache"
    __slots__ = ("name", "window_s", "k", "block_bytes", "max_blocks", "min_colocate", "max_batch", "by_tokens", "clock", "_window", "_groups")

    def __init__(
        self,
        name: str = "burst-prefix-cache",
        window_ms: int = 100,
        max_per_replica: int = -1,
        block_tokens: int = 64,
        max_prefix_tokens: int = 0,
        min_colocate_blocks: int = 0,
        max_batch: int = 1000,
        balance_by: str = "requests",
        clock: Any = time.monotonic,
    ) -> None:
        self.name = name
        self.window_s = window_ms / 1000.0
        self.k = max_per_replica
        self.block_bytes = block_tokens * CHARS_PER_TOKEN
        self.max_blocks = max(1, max_prefix_tokens // block_tokens) if max_prefix_tokens > 0 else 256
        self.min_colocate = min_colocate_blocks
        self.max_batch = max_batch
        self.by_tokens = balance_by == "tokens"
        self.clock = clock
        self._window: deque[tuple[float, tuple[int, ...], str]] = deque()  # (time, block hashes, replica)
        self._groups: dict[int, OrderedDict[str, int]] = {}  # last hash → replica → assignments in the window

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "BurstPrefixCacheScorer":
        check_keys(params, ("windowDurationMs", "maxPerReplica", "blockSizeTokens", "maxPrefixTokensToMatch", "minColocateBlocks", "maxBatchSize", "balanceBy"))
        window = get_int(params, "windowDurationMs", 100)
        if not 1 <= window <= 10000:
            raise ValueError(f"parameter 'windowDurationMs' must be in 1..10000, got {window}")
        k = get_int(params, "maxPerReplica", -1)
        if k == 0 or k < -1:
            raise ValueError(f"parameter 'maxPerReplica' must be -1 (unlimited) or >= 1, got {k}")
        bt = get_int(params, "blockSizeTokens", 64, minimum=1)
        mpt = get_int(params, "maxPrefixTokensToMatch", 0, minimum=0)
        if 0 < mpt < bt:
            raise ValueError("parameter 'maxPrefixTokensToMatch' must be 0 or >= blockSizeTokens")
        mb = get_int(params, "maxBatchSize", 1000)
        if mb == 0 or mb < -1:
            raise ValueError(f"parameter 'maxBatchSize' must be -1 or >= 1, got {mb}")
        return cls(
            name, window, k, bt, mpt, get_int(params, "minColocateBlocks", 0, minimum=0), mb,
            get_choice(params, "balanceBy", "requests", ("requests", "tokens")),
        )  # fmt: skip

    def _expire(self, now: float) -> None:
        w = self._window
        while w and (now - w[0][0] > self.window_s or (self.max_batch > 0 and len(w) > self.max_batch)):
            _, hashes, replica = w.popleft()
            g = self._groups.get(hashes[-1])
            if g is not None:
                n = g.get(replica, 0) - 1
                if n > 0:
                    g[replica] = n
                else:
                    g.pop(replica, None)
                if not g:
                    del self._groups[hashes[-1]]

    def _load(self, e: Endpoint, counts: Mapping[str, int]) -> tuple[float, int]:
        if self.by_tokens:
            return (float(e.inflight_prefill_tokens + e.inflight_decode_tokens), counts.get(e.address, 0))
        return (float(counts.get(e.address, 0)), e.inflight)

    def _assign(self, hashes: tuple[int, ...], candidates: Sequence[Endpoint]) -> str | None:
        by_addr = {e.address: e for e in candidates}
        group = self._groups.get(hashes[-1])
        if group is not None:
            for replica, n in reversed(group.items()):  # the most recently used replica of the group first
                if replica in by_addr and (self.k < 0 or n < self.k):
                    return replica
            counts: dict[str, int] = {}
            for _, _, r in self._window:
                counts[r] = counts.get(r, 0) + 1
            spill = [e for e in candidates if e.address not in group]
            if spill:
                return min(spill, key=lambda e: self._load(e, counts)).address
            return None
        if self.min_colocate > 0 and len(hashes) >= self.min_colocate:
            key = hashes[self.min_colocate - 1]
            counts = {}
            for _, _, r in self._window:
                counts[r] = counts.get(r, 0) + 1
            fair = math.ceil((len(self._window) + 1) / max(1, len(candidates)))
            for _, h, r in reversed(self._window):
                if len(h) >= self.min_colocate and h[self.min_colocate - 1] == key and r in by_addr and counts.get(r, 0) < fair:
                    return r
        return None

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        now = self.clock()
        self._expire(now)
        hashes = tuple(hash_prompt(request.prompt_text, request.target_model, self.block_bytes, self.max_blocks))
        replica = self._assign(hashes, candidates) if hashes else None
        cycle.set(_STATE, (hashes, replica))
        return [1.0 if e.address == replica else 0.0 for e in candidates]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        st = cycle.get(_STATE)
        if st is None or not st[0]:
            return
        hashes = st[0]
        replica = result.primary.address
        self._window.append((self.clock(), hashes, replica))
        g = self._groups.setdefault(hashes[-1], OrderedDict())
        g[replica] = g.pop(replica, 0) + 1
