"""In-flight accounting and per-request observations.

Every dispatched request gets one ``Flight``. It is finished exactly once, whichever way the request ends:
end of the response stream, an error status, the client disconnecting, a stream that ends without ``[DONE]``,
or — as a last resort against leaks — a TTL sweep. Finishing decrements the pod's in-flight counters and hands
the ``Observation`` to the scheduler's response observers (prefix index, latency predictor, ...).

Flights are keyed by a random id the scheduler draws (``Flight.key``), never by the client's ``x-request-id``:
the key travels to Envoy as ``x-extproc-request-id`` (Envoy strips any client-supplied copy before routing),
and the observation stream finds its flight by it. Two requests with the same client id are two flights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint
from extproc.predictor.features import observe_chunk
from extproc.scheduling.framework import Observation

log = logging.getLogger(__name__)

_USAGE_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL_BYTES = 4096


class Flight:
    __slots__ = (
        "key",
        "request",
        "endpoint",
        "obs",
        "prefill_tokens",
        "decode_tokens",
        "in_prefill",
        "finished",
        "chunks",
        "tail",
        "observed",
        "response_started",
        "prefill_endpoint",
        "sampled",
        "local_prefill_tokens",
    )

    def __init__(
        self, request: InferenceRequest, endpoint: Endpoint, obs: Observation, decode_tokens: int, key: str = ""
    ) -> None:
        self.key = key or secrets.token_hex(12)  # 96 random bits: not chosen, not guessable by a client
        self.request = request
        self.endpoint = endpoint
        self.obs = obs
        self.prefill_tokens = obs.prompt_tokens
        # prompt tokens charged to ``endpoint`` until the first token: all of them when it prefills itself, none
        # for a P/D split (the decode pod only READs the KV the prefill pod computed; ``dispatch`` sets 0)
        self.local_prefill_tokens = obs.prompt_tokens
        self.decode_tokens = decode_tokens
        self.in_prefill = True
        self.finished = False
        self.chunks = 0  # SSE data events seen
        self.tail = b""  # last bytes of the body, for the usage block
        self.observed = False  # an observability stream attached
        self.response_started = False
        # P/D: the prefill pod of the request's first leg, accounted until the decode pod answers (the sidecar
        # sends the decode leg only once the prefill leg is done)
        self.prefill_endpoint: Endpoint | None = None
        # observability mode: the routing answer put this request in the observation sample (x-extproc-observe)
        self.sampled = False

    # -- response side -------------------------------------------------------------------------------
    def on_response_headers(self, status: int, prefill_ms: float = 0.0) -> None:
        self.obs.status = status
        self.response_started = True
        if prefill_ms > 0:
            self.obs.prefill_ms = prefill_ms
        self.release_prefill()

    def apply_remote(self, status: int, prefill_ms: float, first_token_ts: float | None, chunks: int, tail: bytes) -> None:
        """What another scheduler replica's observation stream saw of this flight's response (active-active:
        Envoy opened the observation stream on a replica that does not own the flight; server/replication.py).
        ``first_token_ts`` is already on this tracker's clock."""
        self.observed = True
        if not self.response_started and status:
            self.on_response_headers(status, prefill_ms)
        if first_token_ts is not None and self.in_prefill and self.request.stream:
            self.obs.first_token_ts = first_token_ts
            self._leave_prefill()
        self.chunks = max(self.chunks, chunks)
        if tail:
            self.tail = tail[-_TAIL_BYTES:]

    def prefill_leg_done(self, now: float) -> None:
        """The prefill leg ended at ``now`` (tracker clock) and the decode leg starts: a driver that sees the leg
        itself (the virtual-time benchmark) records its time like the sidecar's ``x-pd-prefill-ms`` and frees
        the prefill pod."""
        if self.prefill_endpoint is not None and self.obs.prefill_ms <= 0.0:
            self.obs.prefill_ms = max((now - self.obs.dispatch_ts) * 1000.0, 1e-6)
        self.release_prefill()

    def release_prefill(self) -> None:
        pep = self.prefill_endpoint
        if pep is not None:
            self.prefill_endpoint = None
            pep.release_inflight(prefill_tokens=self.prefill_tokens)

    def on_body_chunk(self, data: bytes, now: float) -> None:
        if data:
            observe_chunk(self.endpoint, now)  # last_chunk_ts + step-interval EWMA (predictor step phase)
            if self.in_prefill and self.request.stream:
                self.obs.first_token_ts = now
                self._leave_prefill()
            self.chunks += data.count(b"data: ")
            t = self.tail + data
            self.tail = t[-_TAIL_BYTES:] if len(t) > _TAIL_BYTES else t

    def _leave_prefill(self) -> None:
        if self.in_prefill:
            self.in_prefill = False
            self.endpoint.prefill_done(self.local_prefill_tokens, self.decode_tokens)

    def output_tokens(self) -> int:
        m = None
        for m in _USAGE_RE.finditer(self.tail):
            pass
        if m is not None:
            return int(m.group(1))
        if self.request.stream and self.chunks:
            # one token per data event, minus [DONE] and the usage-only chunk
            n = self.chunks - (1 if b"[DONE]" in self.tail else 0)
            return max(n, 0)
        return 0


def observed_outcome(f: Flight) -> str:
    """The outcome of a flight whose response an observation stream saw to its end."""
    status = f.obs.status
    if 0 < status < 400:
        if f.request.stream and b"[DONE]" not in f.tail:
            return "stream_without_done"
        return "ok"
    return f"status_{status}"


class FlightTracker:
    """Owns every Flight; all methods run on the event loop thread."""

    def __init__(
        self,
        on_complete: Callable[[InferenceRequest, Observation], None],
        on_outcome: Callable[[str], None] | None = None,
        max_age_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # the virtual-time benchmark passes its clock: same accounting, virtual timestamps
        self._flights: dict[str, Flight] = {}
        self._on_complete = on_complete
        self._on_outcome = on_outcome
        self.max_age_s = max_age_s
        self._sweeper: asyncio.Task[None] | None = None
        # ``<replica tag>.``: with several scheduler replicas a flight key names its owner (server/replication.py)
        self.key_prefix = ""
        self.changes = 0  # dispatches + finishes so far (the replication layer publishes load only when it moved)

    def __len__(self) -> int:
        return len(self._flights)

    def dispatch(
        self,
        request: InferenceRequest,
        endpoint: Endpoint,
        features: object = None,
        prefill: Endpoint | None = None,
        prefill_features: object = None,
    ) -> Flight:
        prompt_tokens = request.prompt_tokens_estimate
        decode = request.max_tokens if request.max_tokens is not None else 16
        obs = Observation(
            request_id=request.request_id,
            endpoint=endpoint.address,
            model=request.target_model,
            prompt_tokens=prompt_tokens,
            dispatch_ts=self.clock(),
            features=features,
        )
        prefix = self.key_prefix
        f = Flight(request, endpoint, obs, decode, prefix + secrets.token_hex(12) if prefix else "")
        while f.key in self._flights:  # never in practice (96 random bits); keeps keys unique regardless
            f.key = prefix + secrets.token_hex(12)
        self._flights[f.key] = f
        self.changes += 1
        split = prefill is not None and prefill is not endpoint
        if split:
            f.local_prefill_tokens = 0
        endpoint.add_inflight(f.local_prefill_tokens, request.sheddable)
        if prefill is not None and split:
            f.prefill_endpoint = prefill
            obs.prefill_endpoint = prefill.address
            obs.prefill_features = prefill_features
            prefill.add_inflight(prompt_tokens)
        return f

    def get(self, key: str) -> Flight | None:
        """The flight whose :attr:`Flight.key` is ``key`` (the ``x-extproc-request-id`` of the observation stream)."""
        return self._flights.get(key)

    def finish(self, flight: Flight, outcome: str, complete_ts: float | None = None) -> None:
        """Finish once. ``complete_ts`` (monotonic): when the response really ended, if known better than now
        (the access log reports it a flush interval later)."""
        if flight.finished:
            return
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        self._finish(flight, outcome, complete_ts)

    def _finish(self, f: Flight, outcome: str, complete_ts: float | None = None) -> None:
        f.finished = True
        self.changes += 1
        f.release_prefill()
        if f.in_prefill:
            f.endpoint.release_inflight(prefill_tokens=f.local_prefill_tokens, batch=f.request.sheddable)
        else:
            f.endpoint.release_inflight(decode_tokens=f.decode_tokens, batch=f.request.sheddable)
        f.obs.complete_ts = complete_ts if complete_ts is not None else self.clock()
        f.obs.output_tokens = f.output_tokens()
        if outcome != "ok":
            f.obs.error = outcome
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        try:
            self._on_complete(f.request, f.obs)
        except Exception:  # an observer must never break accounting
            log.exception("response observer failed")

    def finish_all(self, outcome: str = "shutdown") -> None:
        for f in list(self._flights.values()):
            self.finish(f, outcome)

    def sweep(self, now: float | None = None) -> int:
        now = now if now is not None else self.clock()
        stale = [f for f in self._flights.values() if now - f.obs.dispatch_ts > self.max_age_s]
        for f in stale:
            self.finish(f, "expired")
        return len(stale)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name="flight-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.finish_all()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.max_age_s / 4))
            n = self.sweep()
            if n:
                log.warning("expired in-flight requests", extra={"count": n})
