"""Flow control: when the fleet is saturated, non-sheddable requests wait in bounded per-priority queues.

* Bands by priority (higher first). Within a band, round robin across ``x-gateway-inference-fairness-id`` so
  one tenant's burst cannot starve another's; FIFO within a tenant.
* Each waiting request has a TTL (503 ``queue_timeout`` on expiry); a full band rejects at once (429
  ``queue_full``). Sheddable requests (priority < 0) are never queued: the handler sheds them with 429.
* Release: whenever a dispatched request finishes and on a periodic tick (the scrape interval), the head of
  the best band is released if its model's pods are no longer saturated. One release at a time: the released
  request is dispatched (our in-flight count rises) before the next check, so a burst is not released at once.

Headroom for high priority: ``flowControl.saturationDetector`` (same keys as the top-level
``saturationDetector``) gives the queue gate its own, looser thresholds. Sheddable requests are then shed while
non-sheddable ones still pass: batch never takes the capacity kept for interactive traffic, and interactive
requests queue only when that headroom is used up too.

Off by default (the reference keeps flow control behind a feature gate); enable with
``flowControl: {enabled: true}`` in the config. The fast path (not saturated, empty queues) costs one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.admission.saturation import SaturationDetector
from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint
from extproc.scheduling.framework import SchedulingError
from extproc.services import ServiceKey

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FlowControlConfig:
    enabled: bool = False
    max_queue_per_band: int = 1024
    queue_ttl_s: float = 30.0
    tick_s: float = 0.05
    # Optional thresholds of the gate for non-sheddable requests (``flowControl.saturationDetector``). Absent: the
    # main detector gates both. Set looser than the main detector, it keeps headroom for high-priority requests:
    # sheddable (batch) work is shed at the main thresholds, non-sheddable work queues only at these.
    gate: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> "FlowControlConfig":
        enabled = raw.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError("flowControl.enabled must be a boolean")
        mq = raw.get("maxQueueLength", 1024)
        ttl = raw.get("queueTtlSeconds", 30.0)
        if isinstance(mq, bool) or not isinstance(mq, int) or mq < 1:
            raise ValueError("flowControl.maxQueueLength must be an integer >= 1")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
            raise ValueError("flowControl.queueTtlSeconds must be a number > 0")
        gate = raw.get("saturationDetector")
        if gate is not None:
            if not isinstance(gate, dict):
                raise ValueError("flowControl.saturationDetector must be a mapping")
            SaturationDetector.from_config(gate)  # validate now, at load time
        return cls(enabled=enabled, max_queue_per_band=mq, queue_ttl_s=float(ttl), gate=gate)


class _Waiter:
    __slots__ = ("request", "future", "enqueued")

    def __init__(self, request: InferenceRequest, future: asyncio.Future[None]) -> None:
        self.request = request
        self.future = future
        self.enqueued = time.monotonic()


class _Band:
    __slots__ = ("tenants", "size")

    def __init__(self) -> None:
        self.tenants: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.size = 0

    def push(self, w: _Waiter) -> None:
        q = self.tenants.get(w.request.fairness_id)
        if q is None:
            q = self.tenants[w.request.fairness_id] = deque()
        q.append(w)
        self.size += 1

    def peek(self) -> _Waiter | None:
        for q in self.tenants.values():
            if q:
                return q[0]
        return None

    def pop(self, policy: Any | None) -> _Waiter | None:
        """The next waiter: round robin over tenants, or the tenant a FairnessPolicy picks."""
        if policy is None:
            return self.pop_round_robin()
        for tenant in [t for t, q in self.tenants.items() if not q]:
            del self.tenants[tenant]
        if not self.tenants:
            return None
        queues = {t: (len(q), q[0].enqueued) for t, q in self.tenants.items()}
        tenant = policy.pick_tenant(queues, time.monotonic())
        q = self.tenants.get(tenant)
        if not q:  # a policy naming no waiting tenant: fall back to taking turns
            return self.pop_round_robin()
        w = q.popleft()
        self.size -= 1
        if not q:
            del self.tenants[tenant]
        return w

    def pop_round_robin(self) -> _Waiter | None:
        while self.tenants:
            tenant, q = next(iter(self.tenants.items()))
            if not q:
                del self.tenants[tenant]
                continue
            w = q.popleft()
            self.size -= 1
            # move this tenant to the back: the next release serves another tenant first
            self.tenants.move_to_end(tenant)
            if not q:
                del self.tenants[tenant]
            return w
        return None

    def remove(self, w: _Waiter) -> bool:
        q = self.tenants.get(w.request.fairness_id)
        if q is None:
            return False
        try:
            q.remove(w)
        except ValueError:
            return False
        self.size -= 1
        if not q:
            del self.tenants[w.request.fairness_id]
        return True


# the server's flow controller (when flow control is on)
FLOW_CONTROL: ServiceKey[FlowController] = ServiceKey("flow_control")


class FlowController:
    def __init__(
        self,
        cfg: FlowControlConfig,
        saturation: SaturationDetector,
        candidates: Callable[[str], Sequence[Endpoint]],
        fairness: dict[Any, Any] | None = None,
        usage_limit: Any | None = None,
        known_priorities: Sequence[int] = (),
    ) -> None:
        """``fairness``: FairnessPolicy by band priority, ``"default"`` for every other band (None: round robin).
        ``usage_limit``: a UsageLimitPolicy; its bands are ``known_priorities`` (configured bands and objectives),
        0, and every priority waiting or asking, ranked highest first."""
        self.cfg = cfg
        self.fairness = dict(fairness or {})
        self.usage_limit = usage_limit
        self.known_priorities = frozenset(known_priorities) | {0}
        # the gate for non-sheddable requests: its own thresholds when configured, else the shared detector
        self.saturation = SaturationDetector.from_config(cfg.gate) if cfg.gate is not None else saturation
        self.candidates = candidates  # model → endpoints serving it
        self._bands: dict[int, _Band] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.enqueued = 0
        self.released = 0
        self.expired = 0
        self.rejected_full = 0
        self.peer_queued = 0  # requests other scheduler replicas hold queued (server/replication.py)

    def queued(self) -> int:
        return sum(b.size for b in self._bands.values())

    def waiting(self) -> int:
        """Requests queued here and at the other scheduler replicas."""
        return self.queued() + self.peer_queued

    def stats(self) -> dict[str, int]:
        return {"queued": self.queued(), "enqueued_total": self.enqueued, "released_total": self.released, "expired_total": self.expired, "rejected_full_total": self.rejected_full}

    def must_wait(self, request: InferenceRequest) -> bool:
        """Fast check on the hot path: does this request have to queue?"""
        if not self.cfg.enabled or request.sheddable:
            return False
        if self.queued() or self.peer_queued:
            return True  # keep FIFO fairness: nobody overtakes the queue (ours or another replica's)
        cands = self.candidates(request.target_model)
        return self.saturation.saturated(cands) or self._held(request.priority, cands)

    def _held(self, priority: int, candidates: Sequence[Endpoint]) -> bool:
        """The usage-limit policy holds this band now (saturation ≥ the band's ceiling)."""
        policy = self.usage_limit
        if policy is None:
            return False
        prios = sorted(self.known_priorities | {p for p, b in self._bands.items() if b.size} | {priority}, reverse=True)
        s = self.saturation.level(candidates)
        ceilings = policy.compute_limits(s, len(prios))
        return s >= ceilings[prios.index(priority)]

    async def wait(self, request: InferenceRequest) -> None:
        """Queue until released. Raises SchedulingError 429 (band full) or 503 (TTL expired)."""
        band = self._bands.get(request.priority)
        if band is None:
            band = self._bands[request.priority] = _Band()
        if band.size >= self.cfg.max_queue_per_band:
            self.rejected_full += 1
            raise SchedulingError(429, f"flow-control queue for priority {request.priority} is full ({band.size} waiting)", "queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w = _Waiter(request, fut)
        band.push(w)
        self.enqueued += 1
        self._ensure_ticker()
        self.notify()
        try:
            # not wait_for: on Python 3.11 it can swallow a cancel that races the release (the request would then be
            # dispatched for a stream that is gone)
            async with asyncio.timeout(self.cfg.queue_ttl_s):
                await asyncio.shield(fut)
        except TimeoutError:
            if band.remove(w):
                self.expired += 1
                self._drop_if_empty(request.priority, band)
                raise SchedulingError(503, f"request waited {self.cfg.queue_ttl_s:.0f}s in the flow-control queue without capacity", "queue_timeout") from None
            # released at the very moment the TTL fired: go ahead
        except asyncio.CancelledError:
            band.remove(w)
            self._drop_if_empty(request.priority, band)
            raise

    def _drop_if_empty(self, prio: int, band: _Band) -> None:
        """Bands are keyed by a client-supplied priority: an empty one goes, so the map stays as small as the
        set of priorities actually waiting (and ``notify``'s sort with it)."""
        if band.size == 0 and self._bands.get(prio) is band:
            del self._bands[prio]

    def notify(self) -> None:
        """Release the head of the best band if its model has capacity. Cheap; call freely."""
        if not self._bands:
            return
        for prio in sorted(self._bands, reverse=True):
            band = self._bands[prio]
            head = band.peek()
            if head is None:
                continue
            cands = self.candidates(head.request.target_model)
            if self.saturation.saturated(cands) or self._held(prio, cands):
                return  # strict priority: lower bands wait while a higher band is blocked
            w = band.pop(self.fairness.get(prio, self.fairness.get("default")))
            self._drop_if_empty(prio, band)
            if w is not None and not w.future.done():
                w.future.set_result(None)
                self.released += 1
            return

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="flow-control-tick")

    async def _tick(self) -> None:
        while self.queued():
            await asyncio.sleep(self.cfg.tick_s)
            self.notify()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
