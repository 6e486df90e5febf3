"""``queue-scorer``: min–max normalised waiting-queue length (``vllm:num_requests_waiting``), lower is better.

score = (max − waiting) / (max − min); all candidates equal → 1.0 (GIE ``queue-scorer``,
kubernetes-sigs/gateway-api-inference-extension pkg/epp/scheduling/framework/plugins/scorer/queue.go).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins._params import check_keys
from extproc.scheduling.registry import PluginContext, register


def min_max_lower_is_better(values: list[int] | list[float]) -> list[float]:
    """(max − v) / (max − min) per value; all equal (or empty) → 1.0 each."""
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = float(hi - lo)
    return [(hi - v) / span for v in values]


@register
class QueueScorer:
    type_name: ClassVar[str] = "queue-scorer"
    __slots__ = ("name",)

    def __init__(self, name: str = "queue-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "QueueScorer":
        check_keys(params, ())
        return cls(name)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return min_max_lower_is_better([e.metrics.waiting for e in candidates])
