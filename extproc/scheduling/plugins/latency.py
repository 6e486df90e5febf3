"""``predicted-latency-scorer``: score pods by the latency the online-trained model predicts for this request.

score = 1 − (ttftWeight · norm(TTFT̂) + tpotWeight · norm(TPOT̂)) / (ttftWeight + tpotWeight), where norm is
min–max over the candidates and TTFT̂/TPOT̂ are the quantile-model (p90 by default) predictions; all equal → 1.0.
Without a model (cold start, fewer than ``minSamples`` observations) or on any predictor failure the decision is a
fallback, counted in ``extproc_predictor_fallback_total``. What the scorer returns then is ``coldStart``:

- ``step-time`` (default): a model-free latency estimate from what each pod has shown so far, measured step time ×
  (requests in flight + 1) — the pod's own per-token time (``step_interval_ms``, the EWMA of its chunk gaps) times
  the requests that will share its steps — scored 1 − min–max like a prediction. Pods not yet measured are given
  the fastest measured step time (optimistic, so they get traffic and are measured); with fewer than two measured
  candidates every pod gets 0.0. This is what keeps a cold fleet of fast and slow pods from being split by
  scraped queue/KV alone until the first model exists (docs/predictor.md, "Cold start in real time").
- ``neutral``: 0.0 for every pod, so the profile's heuristic scorers decide alone (the behaviour before).

P/D (``disagg-profile-handler`` sets the cycle's ``PD_STAGE``): in the ``prefill`` profile the model predicts the
prefill leg's time on each prefill pod and the score is TTFT-only (a prefill leg has no TPOT); its cold start
(either mode but ``neutral``) is the least outstanding prefill work — prompt tokens in flight on the pod plus this
request's uncached tokens, counted by the tracker at decision time — since prefill pods stream nothing to measure a
step time from. In the ``decode`` profile it predicts TTFT after the prefill leg (transfer + decode-side queueing,
``kv_transfer_*`` features) and TPOT, blended as usual.

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
    PD_STAGE,
    PD_STAGE_PREFILL,
    CycleState,
    Endpoint,
    InferenceRequest,
    Observation,
    PluginContext,
    check_keys,
    get_float,
    register,
)
from extproc.predictor.features import INFLIGHT, INFLIGHT_PREFILL_TOKENS, STEP_INTERVAL_MS, UNCACHED_INPUT_TOKENS
from extproc.predictor.service import SERVICE_PARAM_KEYS, PredictorService

NEUTRAL = 0.0
COLD_START_MODES = ("step-time", "neutral")


def cold_step_time_scores(matrix: np.ndarray) -> list[float] | None:
    """``coldStart: step-time`` scores from the feature matrix (one row per candidate), or None when fewer than two
    candidates have a measured step time. Bounded: O(candidates), no allocation beyond a few small arrays."""
    step = matrix[:, STEP_INTERVAL_MS]
    measured = ~np.isnan(step)
    if int(measured.sum()) < 2:
        return None
    step = np.where(measured, step, float(step[measured].min()))
    est = step * (matrix[:, INFLIGHT] + 1.0)
    lo = float(est.min())
    span = float(est.max()) - lo
    if span <= 0.0:
        return [1.0] * len(est)
    return (1.0 - (est - lo) / span).tolist()  # type: ignore[no-any-return]


def cold_prefill_work_scores(matrix: np.ndarray) -> list[float]:
    """Prefill-stage cold start: 1 − min–max of (prompt tokens in flight on the pod + this request's uncached
    tokens there): the pod that will finish this prompt's prefill first, by outstanding work counted locally."""
    work = np.nan_to_num(matrix[:, INFLIGHT_PREFILL_TOKENS]) + np.nan_to_num(matrix[:, UNCACHED_INPUT_TOKENS])
    lo = float(work.min())
    span = float(work.max()) - lo
    if span <= 0.0:
        return [1.0] * len(work)
    return (1.0 - (work - lo) / span).tolist()  # type: ignore[no-any-return]


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
    __slots__ = ("name", "service", "ttft_weight", "tpot_weight", "cold_start")

    def __init__(self, name: str, service: PredictorService, ttft_weight: float = 0.8, tpot_weight: float = 0.2,
                 cold_start: str = "step-time") -> None:
        if ttft_weight < 0 or tpot_weight < 0 or ttft_weight + tpot_weight <= 0:
            raise ValueError("ttftWeight and tpotWeight must be >= 0 and not both 0")
        if cold_start not in COLD_START_MODES:
            raise ValueError(f"coldStart must be one of {', '.join(COLD_START_MODES)}, not {cold_start!r}")
        self.cold_start = cold_start
        self.name = name
        self.service = service
        self.ttft_weight = ttft_weight
        self.tpot_weight = tpot_weight

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PredictedLatencyScorer":
        check_keys(params, SERVICE_PARAM_KEYS | {"ttftWeight", "tpotWeight", "coldStart"})
        svc = PredictorService.get_or_create(ctx.services, params, owner=name)
        return cls(
            name,
            svc,
            get_float(params, "ttftWeight", 0.8, minimum=0.0),
            get_float(params, "tpotWeight", 0.2, minimum=0.0),
            str(params.get("coldStart", "step-time")),
        )

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[float]:
        n = len(candidates)
        if n == 0:
            return []
        ps = self.service.predict(cycle, request, candidates)
        pred = ps.prediction
        prefill_stage = cycle.data.get(PD_STAGE) == PD_STAGE_PREFILL
        if pred is None:
            if prefill_stage and self.cold_start != "neutral" and ps.matrix is not None and len(ps.matrix) == n:
                return cold_prefill_work_scores(ps.matrix)
            if self.cold_start == "step-time" and ps.matrix is not None and len(ps.matrix) == n:
                cold = cold_step_time_scores(ps.matrix)
                if cold is not None:
                    return cold
            return [NEUTRAL] * n
        if prefill_stage:  # the prefill leg: its time is the whole prediction (no TPOT on a prefill pod)
            blended = blend_normalised(pred.ttft_ms, pred.tpot_ms, 1.0, 0.0)
        else:
            blended = blend_normalised(pred.ttft_ms, pred.tpot_ms, self.ttft_weight, self.tpot_weight)
        return (1.0 - blended).tolist()  # type: ignore[no-any-return]

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None:
        self.service.observe(observation)
