"""``batch-free-scorer``: an interactive request (not sheddable) prefers pods with no batch work in flight.

Score ``1 / (1 + batch requests in flight)`` from ``Endpoint.inflight_batch`` (our own exact count): 1.0 on a pod
free of batch, whatever the other pods hold, then fewer is better. Not min–max: one batch line already costs an
interactive request the wait for the running decode step (docs/batch.md), so 1 vs 2 lines must not weigh like
0 vs 13. Batch-band requests (sheddable) score 1.0 everywhere: where they may go is ``batch-reserve-filter``'s
call. Give it a weight above the sum of the other scorers' weights so that a cached prefix on a batch pod does
not pull an interactive request off the pods kept free (``batch-interactive``: 10 against 3 + 2 + 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, register


@register
class BatchFreeScorer:
    type_name: ClassVar[str] = "batch-free-scorer"
    __slots__ = ("name",)

    def __init__(self, name: str = "batch-free-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "BatchFreeScorer":
        check_keys(params, ())
        return cls(name)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        if request.sheddable:
            return [1.0] * len(candidates)
        return [1.0 / (1 + max(0, e.inflight_batch)) for e in candidates]
