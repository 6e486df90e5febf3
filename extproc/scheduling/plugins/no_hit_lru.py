"""``no-hit-lru-scorer``: spread *cold* requests (no prefix-cache hit anywhere) over the pods by least-recent use.

Reference: llm-d-router pkg/epp/framework/plugins/scheduling/scorer/nohitlru. A request is cold when no candidate
has a matched prefix block (``PREFIX_MATCHED_BLOCKS`` of the prefix scorer, which must run earlier in the profile;
without prefix state every request is cold). Cold: candidates never picked for a cold request rank first, then
the used ones from least to most recently used; rank r of n scores 1 − r/(n−1) (a single candidate scores 1).
Warm: every candidate scores 0.5 (neutral, leaves cache affinity to the prefix scorer). The pre-request hook moves
the chosen pod (and the prefill pod of a P/D result) to most-recent, for cold requests only.

Parameters: ``lruSize`` (pods tracked, default 1024), ``prefixPluginType`` / ``prefixPluginName`` /
``prefixMatchInfoProducerName`` (accepted for compatibility: here the prefix state is the cycle's shared
``PREFIX_MATCHED_BLOCKS`` whichever prefix plugin produced it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    PREFIX_MATCHED_BLOCKS,
    CycleKey,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_int,
    get_str,
    register,
)

_COLD: CycleKey[bool] = CycleKey("no_hit_lru_cold")


@register
class NoHitLRUScorer:
    type_name: ClassVar[str] = "no-hit-lru-scorer"
    __slots__ = ("name", "lru_size", "_lru")

    def __init__(self, name: str = "no-hit-lru-scorer", lru_size: int = 1024) -> None:
        self.name = name
        self.lru_size = lru_size
        self._lru: OrderedDict[str, None] = OrderedDict()  # oldest first

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "NoHitLRUScorer":
        check_keys(params, ("lruSize", "prefixPluginType", "prefixPluginName", "prefixMatchInfoProducerName"))
        for k in ("prefixPluginType", "prefixPluginName", "prefixMatchInfoProducerName"):
            if k in params:
                get_str(params, k, "x")
        return cls(name, get_int(params, "lruSize", 1024, minimum=1))

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        matched = cycle.get(PREFIX_MATCHED_BLOCKS) or {}
        cold = not any(matched.get(e.address, 0) > 0 for e in candidates)
        cycle.set(_COLD, cold)
        n = len(candidates)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        pos = {a: i for i, a in enumerate(self._lru)}
        never = [i for i, e in enumerate(candidates) if e.address not in pos]
        out = [0.0] * n
        span = float(n - 1)
        for r, i in enumerate(never):
            out[i] = 1.0 - r / span
        base = len(never)
        for i, e in enumerate(candidates):
            p = pos.get(e.address)
            if p is not None:
                out[i] = max(0.0, 1.0 - (base + p) / span)
        return out

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not cycle.get(_COLD):
            return
        for profile in (result.primary_profile, "prefill"):
            r = result.profile_results.get(profile)
            if r is not None and r.targets:
                a = r.targets[0].address
                self._lru.pop(a, None)
                self._lru[a] = None
                while len(self._lru) > self.lru_size:
                    self._lru.popitem(last=False)
