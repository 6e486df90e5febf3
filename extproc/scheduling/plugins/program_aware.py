"""``program-aware-fairness``: a flow-control fairness policy — among the programs (fairness keys) waiting in a band,
serve the one with the least attained service (LAS).

Reference: llm-d-router pkg/epp/framework/plugins/flowcontrol/fairness/program-aware (strategy ``las``). A program is
the request's fairness key (``x-gateway-inference-fairness-id``, or llm-d's ``x-llm-d-inference-fairness-id``).
Attained service = Σ (prompt tokens + 2 × output tokens) of its finished requests, halved every
``lasHalfLifeSeconds`` (60; 0 = no decay). score = ``lasWeightService`` (0.8) × (1 − norm(service)) +
``lasWeightHeadWait`` (0.2) × norm(head-of-queue wait), norm = min–max over the waiting programs (0.5 when all
equal); the highest score is served. A program with no completion for ``evictionTtlSeconds`` (3600) is forgotten,
checked every ``evictionSweepSeconds`` (300). It is also a response observer: it learns service from finished
requests. Active only with flow control on (``featureGates: [flowControl]``) and referenced from
``flowControl.defaultPriorityBand.fairnessPolicyRef`` (or a ``priorityBands`` entry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    InferenceRequest,
    Observation,
    PluginContext,
    check_keys,
    get_choice,
    get_float,
    register,
)

DEFAULT_PROGRAM = ""  # requests without a fairness key share one program


def _norm(v: float, lo: float, hi: float) -> float:
    return 0.5 if hi == lo else (v - lo) / (hi - lo)


@register
class ProgramAwareFairness:
    type_name: ClassVar[str] = "program-aware-fairness"
    __slots__ = ("name", "w_service", "w_wait", "half_life_s", "ttl_s", "sweep_s", "_service", "_last_sweep", "clock")

    def __init__(
        self,
        name: str = "program-aware-fairness",
        w_service: float = 0.8,
        w_wait: float = 0.2,
        half_life_s: float = 60.0,
        ttl_s: float = 3600.0,
        sweep_s: float = 300.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.name = name
        self.w_service = w_service
        self.w_wait = w_wait
        self.half_life_s = half_life_s
        self.ttl_s = ttl_s
        self.sweep_s = sweep_s
        self.clock = clock
        self._service: dict[str, list[float]] = {}  # program → [attained service, decay anchor, last completion]
        self._last_sweep = clock()

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ProgramAwareFairness":
        check_keys(params, ("strategy", "lasWeightService", "lasWeightHeadWait", "lasHalfLifeSeconds", "evictionTtlSeconds", "evictionSweepSeconds"))
        get_choice(params, "strategy", "las", ("las",))
        sweep = get_float(params, "evictionSweepSeconds", 300.0)
        if sweep <= 0:
            raise ValueError("parameter 'evictionSweepSeconds' must be > 0")
        return cls(
            name,
            get_float(params, "lasWeightService", 0.8, minimum=0.0),
            get_float(params, "lasWeightHeadWait", 0.2, minimum=0.0),
            get_float(params, "lasHalfLifeSeconds", 60.0, minimum=0.0),
            get_float(params, "evictionTtlSeconds", 3600.0, minimum=0.0),
            sweep,
        )

    def service(self, program: str, now: float | None = None) -> float:
        st = self._service.get(program)
        if st is None:
            return 0.0
        now = self.clock() if now is None else now
        self._decay(st, now)
        return st[0]

    def _decay(self, st: list[float], now: float) -> None:
        elapsed = now - st[1]
        if elapsed > 0 and self.half_life_s > 0:
            st[0] *= math.exp2(-elapsed / self.half_life_s)
        st[1] = now

    def pick_tenant(self, queues: dict[str, tuple[int, float]], now: float) -> str:
        self._sweep(now)
        entries = {p: (self.service(p, now), (now - head) * 1000.0) for p, (n, head) in queues.items() if n > 0}
        if not entries:
            return next(iter(queues))
        svc = [s for s, _ in entries.values()]
        wait = [w for _, w in entries.values()]
        lo_s, hi_s, lo_w, hi_w = min(svc), max(svc), min(wait), max(wait)
        best, best_score = "", -math.inf
        for p, (s, w) in entries.items():
            score = self.w_service * (1.0 - _norm(s, lo_s, hi_s)) + self.w_wait * _norm(w, lo_w, hi_w)
            if score > best_score:
                best, best_score = p, score
        return best

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None:
        now = self.clock()
        p = request.fairness_id or DEFAULT_PROGRAM
        st = self._service.get(p)
        if st is None:
            st = self._service[p] = [0.0, now, now]
        self._decay(st, now)
        st[0] += observation.prompt_tokens + 2 * observation.output_tokens
        st[2] = now

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_s:
            return
        self._last_sweep = now
        if self.ttl_s > 0:
            for p in [p for p, st in self._service.items() if now - st[2] > self.ttl_s]:
                del self._service[p]
