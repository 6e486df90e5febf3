"""``predicted-latency-scorer``: score pods by the latency the online-trained model predicts for this request.

score = 1 − (ttftWeight · norm(TTFT̂) + tpotWeight · norm(TPOT̂)) / (ttftWeight + tpotWeight), where norm is
min–max over the candidates and TTFT̂/TPOT̂ are the quantile-model (p90 by default) predictions; all equal → 1.0.
Without a model (cold start, fewer than ``minSamples`` observations) or on any predictor failure every candidate
gets 0.0 — a neutral score — so the profile's heuristic scorers decide, and ``extproc_predictor_fallback_total``
counts it.

It is also the ResponseObserver that feeds completed requests (the feature row the server put in
``Observation.features``) to the trainer. List the prefix scorer before it in the profile so
``cycle.data["prefix_scores"]`` is available when features are built.

Parameters: ``ttftWeight`` (0.8), ``tpotWeight`` (0.2), plus the shared predictor-service parameters (given on
one plugin only; a second plugin setting different ones is a config error, see
``extproc.predictor.service.PredictorService.get_or_create`` and ``ServiceConfig.from_params``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    Observation,
    PluginContext,
    check_keys,
    get_float,
    register,
)
from extproc.predictor.service import SERVICE_PARAM_KEYS, PredictorService

NEUTRAL = 0.0


def blend_normalised(ttft: np.ndarray, tpot: np.ndarray, w_ttft: float, w_tpot: float) -> np.ndarray:
    """Min–max normalise each over the candidates and blend: 0 = best on both, 1 = worst on both."""

    def norm(a: np.ndarray) -> np.ndarray:
        lo = float(a.min())
        span = float(a.max()) - lo
        if span <= 0.0:
            return np.zeros_like(a)
        return (a - lo) / span

    total = w_ttft + w_tpot
    if total <= 0.0:
        return np.zeros_like(ttft)
    return (w_ttft * norm(ttft) + w_tpot * norm(tpot)) / total


@register
class PredictedLatencyScorer:
    type_name: ClassVar[str] = "predicted-latency-scorer"
    __slots__ = ("name", "service", "ttft_weight", "tpot_weight")

    def __init__(self, name: str, service: PredictorService, ttft_weight: float = 0.8, tpot_weight: float = 0.2) -> None:
        if ttft_weight < 0 or tpot_weight < 0 or ttft_weight + tpot_weight <= 0:
            raise ValueError("ttftWeight and tpotWeight must be >= 0 and not both 0")
        self.name = name
        self.service = service
        self.ttft_weight = ttft_weight
        self.tpot_weight = tpot_weight

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PredictedLatencyScorer":
        check_keys(params, SERVICE_PARAM_KEYS | {"ttftWeight", "tpotWeight"})
        svc = PredictorService.get_or_create(ctx.services, params, owner=name)
        return cls(
            name,
            svc,
            get_float(params, "ttftWeight", 0.8, minimum=0.0),
            get_float(params, "tpotWeight", 0.2, minimum=0.0),
        )

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[float]:
        n = len(candidates)
        if n == 0:
            return []
        ps = self.service.predict(cycle, request, candidates)
        pred = ps.prediction
        if pred is None:
            return [NEUTRAL] * n
        blended = blend_normalised(pred.ttft_ms, pred.tpot_ms, self.ttft_weight, self.tpot_weight)
        return (1.0 - blended).tolist()  # type: ignore[no-any-return]

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None:
        self.service.observe(observation)
