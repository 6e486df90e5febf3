"""``prefix-cache-affinity-filter``: narrow candidates to the "sticky" pods that already hold most of the prompt.

Reference: llm-d-router pkg/epp/framework/plugins/scheduling/filter/prefixcacheaffinity. Keeps pods whose prefix
score (``PREFIX_SCORES``: matched / total blocks, from a prefix scorer run *earlier in the profile* — put the
scorer's producer first; with no prefix state every score is 0) is ≥ ``affinityThreshold`` (0.80); if none pass,
all are kept. With probability ``explorationProbability`` (0) the gate is skipped. TTFT load gate
(``ttftSource: prefillThroughput``): each pod's TTFT is estimated as its in-flight prefill tokens /
``peakPrefillThroughput`` (15928 tokens/s) × 1000 ms; if the best sticky pod's estimate exceeds the best non-sticky
pod's by more than ``maxTTFTPenaltyMs`` (18000; 0 = always stick) stickiness breaks and all pods are kept.
``ttftSource: latencyPredictor`` reads the predictor's per-pod TTFT (``predicted_ttft_ms``) instead; pods without a
prediction are left out of the gate. ``seed`` makes the exploration draw reproducible.

A filter runs before the scorers of its profile, so when the cycle holds no prefix scores yet the filter asks the
config's ``prefix-cache-scorer`` (the same index and blocks; its result is cached in the cycle, so the scorer does
not hash twice). With no prefix scorer in the config every score is 0 and the filter keeps all pods, as the
reference does without ``PrefixCacheMatchInfo``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    PREFIX_SCORES,
    CycleKey,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    check_keys,
    get_choice,
    get_float,
    get_seed,
    register,
)

PREDICTED_TTFT: CycleKey[dict[str, float]] = CycleKey("predicted_ttft_ms")


@register
class PrefixCacheAffinityFilter:
    type_name: ClassVar[str] = "prefix-cache-affinity-filter"
    __slots__ = ("name", "threshold", "explore", "max_penalty_ms", "source", "peak_tps", "rng", "scorer")

    def __init__(
        self,
        name: str = "prefix-cache-affinity-filter",
        threshold: float = 0.80,
        explore: float = 0.0,
        max_penalty_ms: float = 18000.0,
        source: str = "prefillThroughput",
        peak_tps: float = 15928.0,
        seed: int | None = None,
        scorer: Any = None,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.explore = explore
        self.max_penalty_ms = max_penalty_ms
        self.source = source
        self.peak_tps = peak_tps
        self.rng = random.Random(seed)
        self.scorer = scorer  # the config's services dict, where the first prefix-cache-scorer registers itself

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PrefixCacheAffinityFilter":
        check_keys(params, ("affinityThreshold", "explorationProbability", "maxTTFTPenaltyMs", "ttftSource", "peakPrefillThroughput", "seed"))
        return cls(
            name,
            get_float(params, "affinityThreshold", 0.80, minimum=0.0, maximum=1.0),
            get_float(params, "explorationProbability", 0.0, minimum=0.0, maximum=1.0),
            get_float(params, "maxTTFTPenaltyMs", 18000.0, minimum=0.0),
            get_choice(params, "ttftSource", "prefillThroughput", ("prefillThroughput", "latencyPredictor")),
            get_float(params, "peakPrefillThroughput", 15928.0, minimum=1e-9),
            get_seed(params),
            ctx.services,
        )

    def _ttft(self, cycle: CycleState, e: Endpoint) -> float | None:
        if self.source == "latencyPredictor":
            return (cycle.get(PREDICTED_TTFT) or {}).get(e.address)
        return e.inflight_prefill_tokens / self.peak_tps * 1000.0

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        if self.explore and self.rng.random() < self.explore:
            return candidates
        scores = cycle.get(PREFIX_SCORES)
        scorer = self.scorer.get("prefix_scorer") if self.scorer is not None else None
        if scores is None and scorer is not None:
            vals = scorer.score(cycle, request, candidates)
            scores = {e.address: s for e, s in zip(candidates, vals)}
        scores = scores or {}
        sticky = [e for e in candidates if scores.get(e.address, 0.0) >= self.threshold]
        if not sticky:
            return candidates
        if self.max_penalty_ms > 0 and len(sticky) < len(candidates):
            st = {e.address for e in sticky}
            best_sticky = min((t for e in sticky if (t := self._ttft(cycle, e)) is not None), default=None)
            best_other = min((t for e in candidates if e.address not in st and (t := self._ttft(cycle, e)) is not None), default=None)
            if best_sticky is not None and best_other is not None and best_sticky - best_other > self.max_penalty_ms:
                return candidates
        return sticky
