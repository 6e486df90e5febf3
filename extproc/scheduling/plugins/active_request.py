"""``active-request-scorer`` (llm-d): our own in-flight request counts per pod, fewer is better.

The counts are ``Endpoint.inflight`` (incremented by the server when it dispatches a request, decremented when the
stream ends in any way), so unlike the scraped queue length they react to a burst within the same millisecond.
Score = min–max over the candidates: (max − inflight) / (max − min); all equal → 1.0. (llm-d's variant,
pkg/plugins/scorer/active_request.go, divides by max only; min–max keeps the full 0..1 range when every pod is
busy.)
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
    min_max_lower_is_better,
    register,
)


@register
class ActiveRequestScorer:
    type_name: ClassVar[str] = "active-request-scorer"
    __slots__ = ("name",)

    def __init__(self, name: str = "active-request-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ActiveRequestScorer":
        check_keys(params, ())
        return cls(name)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return min_max_lower_is_better([e.inflight for e in candidates])
