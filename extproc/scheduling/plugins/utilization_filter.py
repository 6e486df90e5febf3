"""``utilization-filter``: drop candidates over any of the configured metric caps.

Reference: llm-d-router pkg/epp/framework/plugins/scheduling/filter/utilization. ``conditions`` is a non-empty list
of ``{metric, maxValue}``; a pod is kept only if every metric ≤ its ``maxValue``. Metrics: ``active-requests``
(extproc's own in-flight count for the pod, running + queued), ``running-requests`` and ``waiting-queue``
(scraped), ``kv-cache-utilization`` (scraped fraction, ``maxValue`` ≤ 1). A pod never scraped reads 0 (the
reference treats a missing metric as 0). ``fallbackOnEmpty: true`` returns the unfiltered candidates when every
pod is dropped. ``inFlightLoadProducerName`` is accepted (our in-flight counts have one producer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_bool, get_float, get_str, register

METRICS: dict[str, Callable[[Endpoint], float]] = {
    "active-requests": lambda e: float(e.inflight),
    "running-requests": lambda e: float(e.metrics.running),
    "waiting-queue": lambda e: float(e.metrics.waiting),
    "kv-cache-utilization": lambda e: e.metrics.kv_usage,
}


@register
class UtilizationFilter:
    type_name: ClassVar[str] = "utilization-filter"
    __slots__ = ("name", "conditions", "fallback_on_empty")

    def __init__(self, name: str, conditions: list[tuple[str, float]], fallback_on_empty: bool = False) -> None:
        self.name = name
        self.conditions = [(METRICS[m], v) for m, v in conditions]
        self.fallback_on_empty = fallback_on_empty

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "UtilizationFilter":
        check_keys(params, ("conditions", "fallbackOnEmpty", "inFlightLoadProducerName"))
        raw = params.get("conditions")
        if not isinstance(raw, list) or not raw:
            raise ValueError("parameter 'conditions' must be a non-empty list of {metric, maxValue}")
        conds: list[tuple[str, float]] = []
        for i, c in enumerate(raw):
            if not isinstance(c, Mapping):
                raise TypeError(f"conditions[{i}] must be a mapping with 'metric' and 'maxValue'")
            check_keys(c, ("metric", "maxValue"))
            m = get_str(c, "metric", "")
            if m not in METRICS:
                raise ValueError(f"conditions[{i}].metric must be one of {', '.join(METRICS)}, got {m!r}")
            if "maxValue" not in c:
                raise ValueError(f"conditions[{i}].maxValue is required")
            v = get_float(c, "maxValue", 0.0, minimum=0.0, maximum=1.0 if m == "kv-cache-utilization" else None)
            conds.append((m, v))
        return cls(name, conds, get_bool(params, "fallbackOnEmpty", False))

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        conds = self.conditions
        kept = [e for e in candidates if all(f(e) <= cap for f, cap in conds)]
        if not kept and self.fallback_on_empty:
            return candidates
        return kept
