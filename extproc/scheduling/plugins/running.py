"""``running-requests-scorer``: min–max normalised ``vllm:num_requests_running``, fewer is better; all equal → 1.0
(GIE pkg/epp/scheduling/framework/plugins/scorer/running.go)."""

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
class RunningRequestsScorer:
    type_name: ClassVar[str] = "running-requests-scorer"
    __slots__ = ("name",)

    def __init__(self, name: str = "running-requests-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "RunningRequestsScorer":
        check_keys(params, ())
        return cls(name)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return min_max_lower_is_better([e.metrics.running for e in candidates])


@register
class RunningRequestsSizeScorer(RunningRequestsScorer):
    """The reference's name for the same scorer (llm-d-router .../scorer/runningrequests: ``running-requests-size-scorer``)."""

    type_name: ClassVar[str] = "running-requests-size-scorer"
    __slots__ = ()
