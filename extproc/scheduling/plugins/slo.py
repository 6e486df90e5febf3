"""SLO-aware picking and admission on top of the latency predictor.

``slo-aware-picker`` (after llm-d's predicted-latency scheduling):
- Prefix-affinity gate: if some candidates have a prefix score ≥ ``affinityThreshold`` (0.8) and a predicted TTFT
  within ``affinityMaxTTFTRatio`` (2.0) × the best predicted TTFT, only those are considered.
- Request with an SLO (``x-slo-ttft-ms`` and/or ``x-slo-tpot-ms``): relative headroom h = (SLO − predicted)/SLO per
  dimension, blended ``ttftWeight`` 0.8 / ``tpotWeight`` 0.2 (a missing SLO drops out of the blend and counts as
  met). Pods meeting every given SLO form the positive tier, used with probability ``positiveTierProbability``
  (0.99): weighted random with weight (1 − h) + 0.05, i.e. favouring the least headroom (best fit, keeping roomy
  pods free for tight requests). Otherwise (no pod meets it, or the exploration draw): an idle pod (nothing
  running, waiting or in flight) with the lowest predicted TTFT, else the least-bad pod (largest blended headroom).
- No SLO: the lowest blended, min–max normalised predicted latency.
- No model / predictor failure: the highest total profile score (the heuristic scorers), random tie-break.
Fallback endpoints (``maxNumOfEndpoints`` > 1) follow in order of predicted latency (or score in fallback).
The tier taken is left in ``cycle.data["slo_tier"]`` (positive / negative / idle / no_slo / fallback).

``slo-admission`` — a filter: a sheddable request (priority < 0) carrying an SLO is refused with 429
``slo_unattainable`` when a model is loaded and no candidate is predicted to meet the SLO. It never filters
candidates and never refuses anything when there is no model or the predictor fails. It runs before the scorers,
so its predictions do not include prefix-cache scores (conservative for cache-warm requests).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from prometheus_client import Counter

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingError,
    ScoredEndpoint,
    check_keys,
    get_float,
    get_int,
    get_seed,
    register,
)
from extproc.predictor.service import CYCLE_PREFIX, SERVICE_PARAM_KEYS, PredictorService
from extproc.scheduling.plugins.latency import blend_normalised

log = logging.getLogger(__name__)

M_TIER = Counter("extproc_predictor_slo_tier", "SLO-aware picker decisions by tier", ["tier"])
M_SHED = Counter("extproc_predictor_slo_shed", "Sheddable requests refused because no pod could meet their SLO")

CYCLE_TIER = "slo_tier"
_BEST_FIT_FLOOR = 0.05


def _relative_headroom(slo: float | None, predicted: np.ndarray) -> np.ndarray | None:
    if slo is None:
        return None
    return (slo - predicted) / slo


@register
class SLOAwarePicker:
    type_name: ClassVar[str] = "slo-aware-picker"
    __slots__ = (
        "name",
        "service",
        "ttft_weight",
        "tpot_weight",
        "positive_probability",
        "affinity_threshold",
        "affinity_ratio",
        "max_endpoints",
        "rng",
        "no_slo_policy",
    )

    def __init__(
        self,
        name: str,
        service: PredictorService,
        *,
        ttft_weight: float = 0.8,
        tpot_weight: float = 0.2,
        positive_probability: float = 0.99,
        affinity_threshold: float = 0.8,
        affinity_ratio: float = 2.0,
        max_endpoints: int = 1,
        seed: int | None = None,
        no_slo_policy: str = "score",
    ) -> None:
        if ttft_weight + tpot_weight <= 0:
            raise ValueError("ttftWeight and tpotWeight must not both be 0")
        self.name = name
        self.service = service
        self.ttft_weight = ttft_weight
        self.tpot_weight = tpot_weight
        self.positive_probability = positive_probability
        self.affinity_threshold = affinity_threshold
        self.affinity_ratio = affinity_ratio
        self.max_endpoints = max_endpoints
        self.rng = random.Random(seed)
        if no_slo_policy not in ("score", "latency"):
            raise ValueError(f"noSloPolicy must be 'score' or 'latency', not {no_slo_policy!r}")
        self.no_slo_policy = no_slo_policy

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "SLOAwarePicker":
        own = {
            "ttftWeight",
            "tpotWeight",
            "positiveTierProbability",
            "affinityThreshold",
            "affinityMaxTTFTRatio",
            "maxNumOfEndpoints",
            "seed",
            "noSloPolicy",
        }
        check_keys(params, SERVICE_PARAM_KEYS | own)
        svc = PredictorService.get_or_create(ctx.services, {k: v for k, v in params.items() if k in SERVICE_PARAM_KEYS}, owner=name)
        return cls(
            name,
            svc,
            ttft_weight=get_float(params, "ttftWeight", 0.8, minimum=0.0),
            tpot_weight=get_float(params, "tpotWeight", 0.2, minimum=0.0),
            positive_probability=get_float(params, "positiveTierProbability", 0.99, minimum=0.0, maximum=1.0),
            affinity_threshold=get_float(params, "affinityThreshold", 0.8, minimum=0.0, maximum=1.0),
            affinity_ratio=get_float(params, "affinityMaxTTFTRatio", 2.0, minimum=1.0),
            max_endpoints=get_int(params, "maxNumOfEndpoints", 1, minimum=1),
            seed=get_seed(params),
            no_slo_policy=str(params.get("noSloPolicy", "score")),
        )

    # ------------------------------------------------------------------ picking

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        if request.slo_ttft_ms is None and request.slo_tpot_ms is None and self.no_slo_policy == "score":
            # No SLO: the predicted-latency scorer is one weighted term among prefix and load scorers, and the
            # highest total wins. (Pure argmin of predicted latency herds requests onto the pod the model
            # currently favours and gives up prefix locality between scrapes.)
            return self._by_score(cycle, scored, "no_slo")
        eps = [s.endpoint for s in scored]
        try:
            ps = self.service.predict(cycle, request, eps)
            pred = ps.prediction
            if pred is None:
                return self._by_score(cycle, scored)
            return self._by_prediction(cycle, request, eps, pred.ttft_ms, pred.tpot_ms)
        except Exception as e:  # never fail a request because of the predictor
            log.warning("slo-aware pick failed, using scores", extra={"error": str(e)})
            return self._by_score(cycle, scored)

    def _tier(self, cycle: CycleState, tier: str) -> None:
        cycle.data[CYCLE_TIER] = tier
        M_TIER.labels(tier).inc()

    def _by_score(self, cycle: CycleState, scored: list[ScoredEndpoint], tier: str = "fallback") -> list[Endpoint]:
        self._tier(cycle, tier)
        order = list(scored)
        self.rng.shuffle(order)  # random tie-break (the sort is stable)
        order.sort(key=lambda s: s.score, reverse=True)
        return [s.endpoint for s in order[: self.max_endpoints]]

    def _by_prediction(
        self, cycle: CycleState, request: InferenceRequest, eps: list[Endpoint], ttft: np.ndarray, tpot: np.ndarray
    ) -> list[Endpoint]:
        n = len(eps)
        idx = np.arange(n)
        prefix = cycle.data.get(CYCLE_PREFIX)
        if prefix:
            best = float(ttft.min())
            warm = np.array(
                [i for i in range(n) if prefix.get(eps[i].address, 0.0) >= self.affinity_threshold and ttft[i] <= best * self.affinity_ratio],
                dtype=np.int64,
            )
            if len(warm):
                idx = warm
        latency_rank = blend_normalised(ttft, tpot, self.ttft_weight, self.tpot_weight)  # over all, for fallbacks
        slo_t, slo_p = request.slo_ttft_ms, request.slo_tpot_ms
        if slo_t is None and slo_p is None:
            sub = blend_normalised(ttft[idx], tpot[idx], self.ttft_weight, self.tpot_weight)
            primary = int(idx[int(np.argmin(sub))])
            self._tier(cycle, "no_slo")
            return self._with_fallbacks(eps, primary, latency_rank)

        ht = _relative_headroom(slo_t, ttft[idx])
        hp = _relative_headroom(slo_p, tpot[idx])
        meets = np.ones(len(idx), dtype=bool)
        blend = np.zeros(len(idx))
        wsum = 0.0
        if ht is not None:
            meets &= ht >= 0.0
            blend += self.ttft_weight * ht
            wsum += self.ttft_weight
        if hp is not None:
            meets &= hp >= 0.0
            blend += self.tpot_weight * hp
            wsum += self.tpot_weight
        if wsum > 0:
            blend /= wsum
        else:  # both weights zero for the given dimensions: equal headroom
            blend[:] = 0.0
        cycle.data["slo_headroom"] = {eps[int(i)].address: float(blend[k]) for k, i in enumerate(idx)}
        positive = np.flatnonzero(meets)
        negative = np.flatnonzero(~meets)
        use_positive = len(positive) > 0 and (len(negative) == 0 or self.rng.random() < self.positive_probability)
        if use_positive:
            h = np.clip(blend[positive], 0.0, 1.0)
            weights = (1.0 - h) + _BEST_FIT_FLOOR
            k = self.rng.choices(range(len(positive)), weights=weights.tolist(), k=1)[0]
            primary = int(idx[positive[k]])
            self._tier(cycle, "positive")
            return self._with_fallbacks(eps, primary, latency_rank)
        pool = negative if len(negative) else positive
        idle = [int(p) for p in pool if _is_idle(eps[int(idx[p])])]
        if idle:
            k = min(idle, key=lambda p: float(ttft[idx[p]]))
            primary = int(idx[k])
            self._tier(cycle, "idle")
        else:
            k = int(pool[int(np.argmax(blend[pool]))])
            primary = int(idx[k])
            self._tier(cycle, "negative")
        return self._with_fallbacks(eps, primary, latency_rank)

    def _with_fallbacks(self, eps: list[Endpoint], primary: int, rank: np.ndarray) -> list[Endpoint]:
        if self.max_endpoints == 1:
            return [eps[primary]]
        rest = [int(i) for i in np.argsort(rank, kind="stable") if int(i) != primary]
        return [eps[primary]] + [eps[i] for i in rest[: self.max_endpoints - 1]]


def _is_idle(ep: Endpoint) -> bool:
    m = ep.metrics
    return ep.inflight == 0 and m.running == 0 and m.waiting == 0


@register
class SLOAdmission:
    type_name: ClassVar[str] = "slo-admission"
    __slots__ = ("name", "service")

    def __init__(self, name: str, service: PredictorService) -> None:
        self.name = name
        self.service = service

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "SLOAdmission":
        check_keys(params, SERVICE_PARAM_KEYS)
        return cls(name, PredictorService.get_or_create(ctx.services, params, owner=name))

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        slo_t, slo_p = request.slo_ttft_ms, request.slo_tpot_ms
        if not request.sheddable or (slo_t is None and slo_p is None) or not candidates or self.service.model is None:
            return candidates
        try:
            pred = self.service.predict(cycle, request, candidates).prediction
        except Exception as e:
            log.warning("slo admission could not predict; admitting", extra={"error": str(e)})
            return candidates
        if pred is None:
            return candidates
        ok = np.ones(len(candidates), dtype=bool)
        if slo_t is not None:
            ok &= pred.ttft_ms <= slo_t
        if slo_p is not None:
            ok &= pred.tpot_ms <= slo_p
        if ok.any():
            return candidates
        M_SHED.inc()
        best_t = float(pred.ttft_ms.min())
        best_p = float(pred.tpot_ms.min())
        raise SchedulingError(
            429,
            "no endpoint is predicted to meet the request's latency objective "
            f"(best predicted TTFT {best_t:.0f} ms{'' if slo_t is None else f' vs {slo_t:.0f} ms'}, "
            f"TPOT {best_p:.1f} ms{'' if slo_p is None else f' vs {slo_p:.1f} ms'}); sheddable request refused",
            "slo_unattainable",
        )

