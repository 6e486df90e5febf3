"""``kv-cache-utilization-scorer``: 1 − ``vllm:kv_cache_usage_perc`` (0..1), so emptier KV caches score higher
(GIE pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go). Out-of-range usage is clamped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, register


@register
class KVCacheUtilizationScorer:
    type_name: ClassVar[str] = "kv-cache-utilization-scorer"
    __slots__ = ("name",)

    def __init__(self, name: str = "kv-cache-utilization-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "KVCacheUtilizationScorer":
        check_keys(params, ())
        return cls(name)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        out: list[float] = []
        for e in candidates:
            u = e.metrics.kv_usage
            out.append(1.0 if u <= 0.0 else 0.0 if u >= 1.0 else 1.0 - u)
        return out
