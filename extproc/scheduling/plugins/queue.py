"""``queue-scorer``: min–max normalised waiting-queue length (``vllm:num_requests_waiting``), lower is better.

score = (max − waiting) / (max − min); all candidates equal → 1.0 (GIE ``queue-scorer``,
kubernetes-sigs/gateway-api-inference-extension pkg/epp/scheduling/framework/plugins/scorer/queue.go).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, min_max_lower_is_better, register


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
