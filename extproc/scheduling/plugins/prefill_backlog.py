"""``prefill-backlog-scorer``: rank prefill pods by when they would finish this request's prefill — least work left.

A prefill pod works through the prompts we send it at a roughly constant token rate, so the time until it is
free is the work it still has, not the number of requests or tokens it holds: a pod whose one prompt is nearly done
beats a pod that just received one. The scorer keeps, per pod, a virtual clock of when its accepted prefill work
ends (``busy_until``): each P/D dispatch to the pod (the ``x-prefiller-host-port`` pick, seen in ``pre_request``)
adds uncached prompt tokens × ms per token from ``max(busy_until, now)``. At decision time

    estimate(pod) = max(0, busy_until − now) + this request's uncached tokens there × ms per token

with the backlog clamped to the pod's prompt tokens in flight × ms per token (the tracker's count: a leg that
ended early frees its work at once) and reset to 0 when the pod has nothing in flight. score = 1 − min–max of the
estimate (all equal → 1.0). The rate is learned online (EWMA of prefill-leg ms / uncached tokens over legs that
found their pod idle: ``Observation.prefill_ms``); ``msPerToken`` is only its starting value. Ties (cold fleet)
go to the pod with fewer tokens in flight. O(candidates) per decision; state is per scheduler replica.

Parameters: ``msPerToken`` (0.02, a start value: ~100 ms per 5k-token prompt), ``learn`` (true).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.contract import PREFILLER_HEADER
from extproc.plugin import (
    PREFIX_SCORES,
    CycleState,
    Endpoint,
    InferenceRequest,
    Observation,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_bool,
    get_float,
    register,
)
from extproc.predictor.features import clock

_CYCLE_KEY = "prefill_backlog"  # address → (uncached tokens, backlog ms at decision time)
EWMA_ALPHA = 0.1
IDLE_BACKLOG_MS = 1e-3
MAX_PENDING = 100_000


@register
class PrefillBacklogScorer:
    type_name: ClassVar[str] = "prefill-backlog-scorer"
    __slots__ = ("name", "ms_per_token", "learn", "busy_until", "_pending", "samples")

    def __init__(self, name: str = "prefill-backlog-scorer", ms_per_token: float = 0.02, learn: bool = True) -> None:
        if not ms_per_token > 0.0:
            raise ValueError(f"parameter 'msPerToken' must be > 0, got {ms_per_token}")
        self.name = name
        self.ms_per_token = ms_per_token
        self.learn = learn
        self.busy_until: dict[str, float] = {}  # address → clock() time its accepted prefill work ends
        self._pending: dict[int, tuple[float, float]] = {}  # id(request) → (uncached tokens, backlog ms) of a split
        self.samples = 0  # rate samples learned

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PrefillBacklogScorer":
        check_keys(params, ("msPerToken", "learn"))
        return cls(name, get_float(params, "msPerToken", 0.02, minimum=1e-9), get_bool(params, "learn", True))

    def backlog_ms(self, ep: Endpoint, now: float) -> float:
        tokens = ep.inflight_prefill_tokens
        if ep.inflight <= 0 or tokens <= 0:
            return 0.0
        left = (self.busy_until.get(ep.address, now) - now) * 1000.0
        cap = tokens * self.ms_per_token
        return cap if left > cap else (left if left > 0.0 else 0.0)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        if not candidates:
            return []
        now = clock()
        n = float(request.prompt_tokens_estimate)
        prefix = cycle.get(PREFIX_SCORES) or {}
        mpt = self.ms_per_token
        seen: dict[str, tuple[float, float]] = {}
        est: list[float] = []
        for ep in candidates:
            p = prefix.get(ep.address, 0.0)
            p = 0.0 if not p > 0.0 else (1.0 if p > 1.0 else p)
            uncached = n * (1.0 - p)
            b = self.backlog_ms(ep, now)
            seen[ep.address] = (uncached, b)
            # the tiny token term breaks ties (a cold fleet, equal backlogs) toward less held work
            est.append(b + uncached * mpt + 1e-9 * ep.inflight_prefill_tokens)
        cycle.data[_CYCLE_KEY] = seen
        lo = min(est)
        span = max(est) - lo
        if span <= 0.0:
            return [1.0] * len(est)
        return [1.0 - (e - lo) / span for e in est]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        addr = result.headers.get(PREFILLER_HEADER) if result.headers else None
        seen = cycle.data.get(_CYCLE_KEY)
        if not addr or not isinstance(seen, dict) or addr not in seen:
            return
        uncached, backlog = seen[addr]
        now = clock()
        start = max(self.busy_until.get(addr, now), now)
        if backlog <= IDLE_BACKLOG_MS:
            start = now  # the pod had nothing left: a stale clock must not delay it
        self.busy_until[addr] = start + uncached * self.ms_per_token / 1000.0
        if self.learn and len(self._pending) < MAX_PENDING:
            self._pending[id(request)] = (uncached, backlog)

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None:
        rec = self._pending.pop(id(request), None)
        if rec is None or not self.learn:
            return
        uncached, backlog = rec
        ms = observation.prefill_ms
        if ms > 0.0 and uncached >= 1.0 and backlog <= IDLE_BACKLOG_MS and observation.prefill_endpoint:
            rate = ms / uncached  # a leg that found its pod idle: its time is the pod's service time
            self.ms_per_token += EWMA_ALPHA * (rate - self.ms_per_token)
            self.samples += 1
