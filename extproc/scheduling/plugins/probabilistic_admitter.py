"""``probabilistic-admitter``: shed sheddable requests (priority < 0) with a probability that rises steeply with
pool saturation; priority ≥ 0 is always admitted.

Reference: llm-d-router pkg/epp/framework/plugins/requestcontrol/admitter/probabilisticadmitter.
saturation = mean over candidate pods of max(waiting / ``queueDepthThreshold``, KV usage / ``kvCacheUtilThreshold``)
(a pod never scraped counts as fully saturated, 1.0); p(reject) = min(saturation^``power`` × ``k``, 1). Defaults
QD 5, KV 0.8, power 5, k 300 (100 % shed at saturation (1/k)^(1/power) ≈ 0.34). No pods → admit. A rejection is a
429 ``rate_limit_error`` with code ``shed_probabilistic``. ``seed`` makes the draws reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingError,
    check_keys,
    get_float,
    get_int,
    get_seed,
    register,
)


def pool_saturation(candidates: Sequence[Endpoint], qd: float, kv: float) -> float:
    total = 0.0
    for e in candidates:
        m = e.metrics
        if m.updated_at == 0.0:
            total += 1.0
        else:
            total += max(m.waiting / qd, m.kv_usage / kv)
    return total / len(candidates)


@register
class ProbabilisticAdmitter:
    type_name: ClassVar[str] = "probabilistic-admitter"
    __slots__ = ("name", "qd", "kv", "power", "k", "rng", "shed")

    def __init__(self, name: str = "probabilistic-admitter", qd: int = 5, kv: float = 0.8, power: float = 5.0, k: float = 300.0, seed: int | None = None) -> None:
        self.name = name
        self.qd = float(qd)
        self.kv = kv
        self.power = power
        self.k = k
        self.rng = random.Random(seed)
        self.shed = 0

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ProbabilisticAdmitter":
        check_keys(params, ("queueDepthThreshold", "kvCacheUtilThreshold", "power", "k", "seed"))
        power = get_float(params, "power", 5.0)
        k = get_float(params, "k", 300.0)
        if power <= 0 or k <= 0:
            raise ValueError("parameters 'power' and 'k' must be > 0")
        kv = get_float(params, "kvCacheUtilThreshold", 0.8, maximum=1.0)
        if kv <= 0:
            raise ValueError("parameter 'kvCacheUtilThreshold' must be in (0, 1]")
        return cls(name, get_int(params, "queueDepthThreshold", 5, minimum=1), kv, power, k, get_seed(params))

    def reject_probability(self, candidates: Sequence[Endpoint]) -> float:
        if not candidates:
            return 0.0
        sat = pool_saturation(candidates, self.qd, self.kv)
        return min(sat**self.power * self.k, 1.0)

    def admit(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None:
        if request.priority >= 0:
            return
        p = self.reject_probability(candidates)
        if p > 0.0 and self.rng.random() < p:
            self.shed += 1
            raise SchedulingError(429, f"sheddable request shed by {self.name} (rejection probability {p:.2f} at current pool saturation)", "shed_probabilistic")
