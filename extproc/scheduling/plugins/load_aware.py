"""``load-aware-scorer`` (llm-d): 0.5 for an empty waiting queue, else 0.5 × (1 − min(waiting, threshold)/threshold).

Semantics and the ``threshold`` parameter (default 128) follow llm-d-inference-scheduler
pkg/plugins/scorer/load_aware.go. Unlike llm-d, a non-positive threshold is a configuration error rather than a
silent fallback to the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_int, register

DEFAULT_QUEUE_THRESHOLD = 128


@register
class LoadAwareScorer:
    type_name: ClassVar[str] = "load-aware-scorer"
    __slots__ = ("name", "threshold")

    def __init__(self, name: str = "load-aware-scorer", threshold: int = DEFAULT_QUEUE_THRESHOLD) -> None:
        if threshold <= 0:
            raise ValueError(f"parameter 'threshold' must be > 0, got {threshold}")
        self.name = name
        self.threshold = threshold

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "LoadAwareScorer":
        check_keys(params, ("threshold",))
        return cls(name, get_int(params, "threshold", DEFAULT_QUEUE_THRESHOLD, minimum=1))

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        ft = float(t)
        out: list[float] = []
        for e in candidates:
            w = e.metrics.waiting
            if w <= 0:
                out.append(0.5)
            else:
                out.append(0.5 * (1.0 - (w if w < t else t) / ft))
        return out
