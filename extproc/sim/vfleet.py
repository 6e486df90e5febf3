"""One virtual-time fleet loop: a discrete-event loop that runs simulated engines step by step, with no sockets
and no sleeps. The virtual benchmark (``extproc.bench.virtual``) and the predictor's training-data generator
(``extproc.sim.trainingdata``) both drive their fleets through it; each brings its own router side.

Events are ``(time, seq, kind, data)`` in one heap; ``seq`` (push order) breaks ties, so arrivals pushed before
the run go ahead of step ends at the same instant. Kinds: ``ARRIVAL`` (``data``: the caller's request index),
``STEP_END`` (handled here) and ``TICK`` (a periodic callback, e.g. a metrics scrape).

Per pod, steps run back to back while the engine has work: :meth:`VirtualFleetLoop.start_step` runs
``Engine.step`` at once (the engine model computes the whole step) and schedules its end; at the end the step's
outputs go to ``deliver(pod, result, now)`` — a step's tokens exist at its end — and the next step starts if the
engine has work. :meth:`VirtualFleetLoop.kick` is "new work arrived": it starts a step on an idle pod, and cuts
short an idle wait (an engine waiting for a remote KV transfer) so the new request is scheduled now; the stale
``STEP_END`` of the cut wait is recognised by its token and dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from extproc.datalayer.endpoint import Endpoint, PodMetrics
from extproc.sim.engine import Engine, StepResult

ARRIVAL = 0
STEP_END = 1
TICK = 2


@dataclass(slots=True)
class VirtualPod:
    """One simulated pod: the scheduler's ``Endpoint`` and the engine model behind it."""

    endpoint: Endpoint
    engine: Engine
    stepping: bool = False
    pending: StepResult | None = None  # the step in progress
    busy_until: float = -1.0  # end of the step in progress; < 0 = idle
    token: int = 0  # bumps on every step start: an idle wait cut short by an arrival leaves a stale STEP_END


def engine_metrics(engine: Engine, updated_at: float) -> PodMetrics:
    """What a scrape of the engine's ``/metrics`` gives the scheduler (waiting, running, KV use, LoRA state,
    prefix-cache counters), read at the instant of the call."""
    st = engine.stats
    prof = engine.profile
    return PodMetrics(
        waiting=engine.num_waiting,
        running=engine.num_running,
        kv_usage=engine.kv_usage,
        running_loras=frozenset(engine.running_loras),
        waiting_loras=frozenset(engine.waiting_loras),
        max_loras=prof.max_loras,
        block_size=prof.block_size,
        num_gpu_blocks=prof.num_gpu_blocks,
        prefix_cache_queries=float(st.prefix_cache_queries),
        prefix_cache_hits=float(st.prefix_cache_hits),
        updated_at=updated_at,
    )


class VirtualFleetLoop:
    """The event heap and the per-pod step cycle; see the module docstring."""

    __slots__ = ("events", "seq", "now", "steps", "deliver")

    def __init__(self, deliver: Callable[[VirtualPod, StepResult, float], None]) -> None:
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.steps = 0  # engine steps run
        self.deliver = deliver

    def push(self, at: float, kind: int, data: Any = None) -> None:
        heapq.heappush(self.events, (at, self.seq, kind, data))
        self.seq += 1

    def add_arrivals(self, times: Iterable[float]) -> None:
        """One ``ARRIVAL`` event per time, ``data`` = its index (call before any other push)."""
        for i, t in enumerate(times):
            self.events.append((t, self.seq, ARRIVAL, i))
            self.seq += 1
        heapq.heapify(self.events)

    def start_step(self, pod: VirtualPod, at: float) -> None:
        res = pod.engine.step(at)
        self.steps += 1
        pod.stepping = True
        pod.pending = res
        pod.busy_until = at + res.duration_s
        pod.token += 1
        self.push(pod.busy_until, STEP_END, (pod, pod.token))

    def _end_step(self, pod: VirtualPod, at: float) -> None:
        res = pod.pending
        assert res is not None
        pod.stepping = False
        pod.pending = None
        pod.busy_until = -1.0
        self.deliver(pod, res, at)

    def kick(self, pod: VirtualPod, at: float) -> None:
        """New work on ``pod``: start a step now unless one runs (an idle wait for a KV transfer is cut short)."""
        if not pod.stepping:
            self.start_step(pod, at)
        elif pod.pending is not None and pod.pending.idle:
            self._end_step(pod, at)
            self.start_step(pod, at)

    def run(
        self,
        on_arrival: Callable[[int, float], None],
        *,
        on_tick: Callable[[Any, float], None] | None = None,
        before: Callable[[float], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Process events in time order until none is left (or ``stop()`` is true before the next one).
        ``before(now)`` runs ahead of every event's handler; ``self.now`` is the current event's time."""
        events = self.events
        while events and not (stop is not None and stop()):
            now, _, kind, data = heapq.heappop(events)
            self.now = now
            if before is not None:
                before(now)
            if kind == ARRIVAL:
                on_arrival(data, now)
            elif kind == STEP_END:
                pod, token = data
                if token != pod.token or not pod.stepping:
                    continue  # an idle wait that an arrival cut short
                self._end_step(pod, now)
                if pod.engine.has_work():
                    self.start_step(pod, now)
            else:
                assert on_tick is not None
                on_tick(data, now)
