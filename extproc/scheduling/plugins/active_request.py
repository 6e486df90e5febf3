"""``active-request-scorer`` (llm-d): our own in-flight request counts per pod, fewer is better.

The counts are ``Endpoint.inflight`` (incremented by the server when it dispatches a request, decremented when the
stream ends in any way), so unlike the scraped queue length they react to a burst within the same millisecond.
Default score = min–max over the candidates: (max − inflight) / (max − min); all equal → 1.0 (keeps the full 0..1
range when every pod is busy). With the reference's parameters (``idleThreshold``, ``maxBusyScore``; llm-d-router
pkg/epp/framework/plugins/scheduling/scorer/activerequest, and every llm-d.ai/v1alpha1 file, where the loader sets
``idleThreshold: 0``) the reference's formula: a pod with ≤ ``idleThreshold`` in flight scores 1.0, a busier one
(max − n) / max × ``maxBusyScore``. ``requestTimeout`` is accepted and ignored (deprecated there too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    check_keys,
    get_duration,
    get_float,
    get_int,
    min_max_lower_is_better,
    register,
)


@register
class ActiveRequestScorer:
    type_name: ClassVar[str] = "active-request-scorer"
    __slots__ = ("name", "idle_threshold", "max_busy_score")

    def __init__(self, name: str = "active-request-scorer", idle_threshold: int | None = None, max_busy_score: float = 1.0) -> None:
        self.name = name
        self.idle_threshold = idle_threshold  # None: extproc's min–max score
        self.max_busy_score = max_busy_score

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ActiveRequestScorer":
        check_keys(params, ("idleThreshold", "maxBusyScore", "requestTimeout"))
        if "requestTimeout" in params:
            get_duration(params, "requestTimeout", 0.0)
        reference = "idleThreshold" in params or "maxBusyScore" in params
        return cls(
            name,
            get_int(params, "idleThreshold", 0, minimum=0) if reference else None,
            get_float(params, "maxBusyScore", 1.0, minimum=0.0, maximum=1.0),
        )

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        counts = [e.inflight for e in candidates]
        idle = self.idle_threshold
        if idle is None:
            return min_max_lower_is_better(counts)
        hi = max(counts, default=0)
        b = self.max_busy_score
        return [1.0 if n <= idle else (hi - n) / hi * b for n in counts]
