"""End of request from Envoy's gRPC access-log service (ALS), and sampling of the observation stream.

In ``observability`` mode a request used to cost two ext_proc streams: the routing stream and an observation
stream (response headers, every body chunk, trailers) that finishes the flight. The observation stream cost
~40 % of the scheduler's CPU per request and ~90 µs of Envoy's (docs/benchmarks.md "Overhead"). Now:

- **Every routed request** is finished by its access-log entry: Envoy's ``envoy.access_loggers.http_grpc``
  logger (HCM ``access_log``, only for requests carrying our ``x-extproc-request-id``) streams batches of
  ``HTTPAccessLogEntry`` (many requests per message, flushed every ``buffer_flush_interval``) to
  ``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`` on the scheduler's gRPC port. An entry
  gives the flight's key (the logged ``x-extproc-request-id`` header), the response code, response flags
  (downstream disconnect, upstream reset) and Envoy's own timing, from which the completion time is put back
  on the monotonic clock. In-flight accounting therefore loses nothing; a release is late by at most the flush
  interval (10 ms in the rendered config).
- **A sample** of requests also gets the observation stream, for what only the body shows: TTFT (first chunk),
  output tokens (usage block / SSE events), ``[DONE]``, the pod's chunk cadence (predictor step-phase
  features). The scheduler picks the sample at dispatch (a token bucket: ``observe_budget`` observed requests
  per second; every request while traffic is below it) and marks it with ``x-extproc-observe: 1``, which
  selects the Envoy route whose per-route config enables the ``extproc-observe`` filter (the plain route
  disables it). A sampled flight is finished by its observation stream as before; the access-log entry is
  then ignored.
- **Fallback.** Until an access-log stream has connected (an Envoy config without the logger, e.g. an older
  bootstrap or the filters-only include), every request is observed, exactly as before.

Predictor labels: TTFT and TPOT come only from observed requests (as before, only streamed ones have a TTFT);
at the default ``observe_budget`` of 50/s the predictor still gets up to 50 labelled requests per second at any
load, and every request is observed while traffic stays below that (the real-time benchmarks, most LLM pools).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from extproc.server import codec
from extproc.server.tracker import Flight, FlightTracker, observed_outcome

log = logging.getLogger(__name__)

ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class ObservationSampler:
    """Token bucket: at most ``rate`` sampled requests per second, bursts up to ``burst``. ``rate < 0``: all."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float = 50.0, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 0.1)
        self._tokens = self.burst
        self._last = time.monotonic()

    def sample(self) -> bool:
        if self.rate < 0:
            return True
        if self.rate == 0:
            return False
        now = time.monotonic()
        t = self._tokens + (now - self._last) * self.rate
        self._last = now
        if t >= 1.0:
            self._tokens = min(t, self.burst) - 1.0
            return True
        self._tokens = t
        return False


def _outcome(status: int, flags: Any) -> str:
    if status == 0:
        if flags.downstream_connection_termination:
            return "disconnected"
        return "reset_before_response"
    if flags.downstream_connection_termination:
        return "disconnected"
    if flags.upstream_remote_reset or flags.upstream_connection_termination:
        return f"status_{status}" if status >= 400 else "disconnected"
    return "ok" if status < 400 else f"status_{status}"


# outcomes of a request that ended without its response: the client left, or it was reset before any response
_CUT = frozenset(("disconnected", "reset_before_response"))


# With replicas a sampled flight's observation stream may be open on another replica, whose view of the response
# (TTFT, tokens) comes to the owner through Redis about as fast as the access-log entry does: the entry waits this
# long for it before it ends the flight without a latency sample.
OBSERVATION_GRACE_S = 0.5


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Serves ``StreamAccessLogs``: finishes the flights the access log reports (unless their observation stream
    owns them)."""

    def __init__(self, tracker: FlightTracker) -> None:
        self.tracker = tracker
        self.streams = 0  # connected access-log streams now
        self.ever_connected = False
        self.entries = 0
        self.finished = 0
        self.forwarded = 0
        # several scheduler replicas: (key, status, outcome, end_wall, upstream_failure) -> handed to the owner?
        self.forward: Callable[[str, int, str, float, bool], bool] | None = None
        self.observations = 0  # foreign observations applied to our flights (replicas)
        self.deferred = 0  # access-log ends that waited for a foreign observation

    @property
    def active(self) -> bool:
        """An Envoy access-log stream is (or was) connected: the access log will report every request."""
        return self.ever_connected

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        """Client streaming: Envoy sends batches until it closes the stream; we answer once at the end."""
        read = context.read
        eof = grpc.aio.EOF
        self.streams += 1
        self.ever_connected = True
        try:
            while True:
                msg = await read()
                if msg is eof:
                    break
                try:
                    self.on_message(msg)
                except Exception:  # a bad entry must never break accounting of the others
                    log.exception("access log message failed")
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def on_message(self, msg: Any) -> None:
        if not msg.HasField("http_logs"):
            return
        now_mono = time.monotonic()
        now_wall = time.time()
        tracker = self.tracker
        key_header = codec.HDR_REQUEST_ID
        forward = self.forward
        for e in msg.http_logs.log_entry:
            self.entries += 1
            key = e.request.request_headers.get(key_header)
            if not key:
                continue
            f = tracker.get(key)
            if f is None and forward is None:
                continue  # unknown (already finished, or not ours)
            if f is not None and f.finished:
                continue
            status = e.response.response_code.value if e.response.HasField("response_code") else 0
            cp = e.common_properties
            outcome = _outcome(status, cp.response_flags)
            if f is not None and f.observed and outcome not in _CUT:
                continue  # its observation stream finishes it (TTFT, tokens)
            # (an observed request that was cut ends here too: its observation stream has nothing left to report,
            # and Envoy closes it only after the filter's deferred_close_timeout, 5 s in which the pod's slot
            # would still count as taken)
            end_wall = 0.0
            if cp.HasField("start_time") and cp.HasField("time_to_last_downstream_tx_byte"):
                end_wall = cp.start_time.ToNanoseconds() / 1e9 + cp.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e9
            upstream_failure = status >= 500 or cp.response_flags.upstream_connection_failure
            if f is None:
                assert forward is not None
                # several scheduler replicas: another one routed this request (server/replication.py)
                if forward(key, status, outcome, end_wall, upstream_failure):
                    self.forwarded += 1
                continue
            if f.sampled and forward is not None and not f.observed:
                self._defer(f, status, outcome, end_wall, upstream_failure)
                continue
            self._finish(f, status, outcome, end_wall, upstream_failure, now_mono, now_wall)

    def finish_forwarded(self, key: str, status: int, outcome: str, end_wall: float, upstream_failure: bool) -> None:
        """An access-log entry another replica received for one of our flights (server/replication.py)."""
        self.ever_connected = True  # the access log reaches us, through a peer
        f = self.tracker.get(key)
        if f is None or f.finished or f.observed:
            return
        if f.sampled:
            self._defer(f, status, outcome, end_wall, upstream_failure)
            return
        self._finish(f, status, outcome, end_wall, upstream_failure, time.monotonic(), time.time())

    def _defer(self, f: Flight, status: int, outcome: str, end_wall: float, upstream_failure: bool) -> None:
        """A sampled flight of ours whose observation stream is on another replica: give that replica's view
        (``finish_forwarded_observation``) :data:`OBSERVATION_GRACE_S` to arrive, then end it from this entry."""
        self.deferred += 1

        def late() -> None:
            if not f.finished:
                self._finish(f, status, outcome, end_wall, upstream_failure, time.monotonic(), time.time())

        asyncio.get_running_loop().call_later(OBSERVATION_GRACE_S, late)

    def finish_forwarded_observation(
        self, key: str, status: int, outcome: str, end_wall: float, upstream_failure: bool,
        first_wall: float, prefill_ms: float, chunks: int, tail: bytes,
    ) -> None:  # fmt: skip
        """Another replica's observation stream saw one of our flights' response to its end: apply its TTFT, token
        count and status, and end the flight as our own observation stream would (the predictor gets the sample).
        Wall times become our monotonic clock by the offset now (replicas share NTP time)."""
        f = self.tracker.get(key)
        if f is None or f.finished:
            return
        now_mono, now_wall = time.monotonic(), time.time()
        first_ts = None
        if first_wall:
            first_ts = max(min(now_mono, now_mono - (now_wall - first_wall)), f.obs.dispatch_ts)
        f.apply_remote(status, prefill_ms, first_ts, chunks, tail)
        if upstream_failure and status:
            f.endpoint.note_upstream_failure()
        complete_ts = None
        if end_wall:
            complete_ts = max(min(now_mono, now_mono - (now_wall - end_wall)), f.obs.dispatch_ts)
        self.tracker.finish(f, outcome or observed_outcome(f), complete_ts=complete_ts)
        self.observations += 1

    def _finish(self, f: Any, status: int, outcome: str, end_wall: float, upstream_failure: bool, now_mono: float, now_wall: float) -> None:
        if status and not f.response_started:
            f.on_response_headers(status)
        complete_ts = None
        if end_wall:
            complete_ts = min(now_mono, now_mono - (now_wall - end_wall))
            complete_ts = max(complete_ts, f.obs.dispatch_ts)
        if upstream_failure:
            f.endpoint.note_upstream_failure()  # upstream trouble: evidence for the health logic (as mode none does)
        self.tracker.finish(f, outcome, complete_ts=complete_ts)
        self.finished += 1


__all__ = ["ALS_METHOD", "AccessLogReceiver", "ObservationSampler"]
