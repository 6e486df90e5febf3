"""The ext_proc stream state machine: ``envoy.service.ext_proc.v3.ExternalProcessor/Process``.

One gRPC stream per HTTP request. Two kinds of stream reach us:

* the **routing** stream (filter ``extproc``): request headers → strip routing headers, read control headers;
  request body (BUFFERED) → parse, admit, schedule, answer with the routing header + ``envoy.lb`` metadata, or an
  ImmediateResponse with a JSON error; response headers → add ``x-gateway-destination-endpoint-served``.
* the **observation** stream (filter ``extproc-observe``, ``observability_mode: true``): Envoy sends copies of the
  request headers (with our ``x-extproc-request-id``), response headers and response body chunks and does not
  wait for answers. We use it for TTFT, output tokens and end of stream without adding a round trip per chunk.

Nothing here blocks: parsing and scheduling are CPU-only and bounded; every exception inside a stream becomes
a 500 ImmediateResponse (or is logged, on an observation stream) — the stream never crashes the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.admission.flow_control import FlowController
from extproc.scheduling.reservation import BATCH_RESERVATION
from extproc.admission.saturation import SaturationDetector
from extproc.api import RequestError, api_for_path, check_body_size, error_body, parse_request
from extproc.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_RESPONSE_OBSERVE, MAX_MESSAGE_TIMEOUT_S, ResponseObserve
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.scrape import SCRAPER
from extproc.datalayer.tokenize import TOKENIZERS
from extproc.observe.metrics import SchedulerMetrics
from extproc.scheduling.framework import Observation, Scheduler, SchedulingError
from extproc.server import codec
from extproc.server.decide import batch_candidates, model_error, schedule_and_dispatch, shed_error
from extproc.server.accesslog import AccessLogReceiver, ObservationSampler
from extproc.predictor.features import observe_chunk
from extproc.server.tracker import Flight, FlightTracker, observed_outcome
from extproc.services import Services

log = logging.getLogger(__name__)

MODELS_PATHS = ("/v1/models", "/models")
HDR_PREFILL_MS = "x-pd-prefill-ms"  # P/D sidecar: prefill-leg wall time


def _float_header(h: Any) -> float:
    v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    try:
        f = float(v)
    except ValueError:
        return 0.0
    return f if 0.0 <= f < 1e9 else 0.0


ORPHAN_GRACE_S = 5.0  # observability mode: how long a dispatched flight may wait for its observation stream
_OBSERVE_HEADER = {codec.HDR_OBSERVE: "1"}


@dataclass(slots=True)
class HandlerSettings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_messages_per_stream: int = 100_000
    max_header_bytes: int = 64 * 1024
    response_observe: ResponseObserve = DEFAULT_RESPONSE_OBSERVE  # contract.RESPONSE_OBSERVE_MODES
    # observability mode: requests per second that also get the observation stream (the rest are finished by the
    # access log); < 0 = every request (server/accesslog.py)
    observe_budget: float = 50.0
    objectives: dict[str, int] = field(default_factory=dict)
    conformance: bool = False  # honour the GIE conformance header test-epp-endpoint-selection


def usage_from_tail(tail: bytes) -> dict[str, Any] | None:
    """The last ``"usage": {...}`` object in the end of a response body (JSON or SSE), or None."""
    i = tail.rfind(b'"usage"')
    while i >= 0:
        j = tail.find(b"{", i)
        if j < 0:
            return None
        try:
            obj, _ = json.JSONDecoder().raw_decode(tail[j:].decode("utf-8", "replace"))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return obj
        i = tail.rfind(b'"usage"', 0, i)
    return None


def parse_endpoint_selection(value: str) -> frozenset[str]:
    """``test-epp-endpoint-selection``: comma list of ``IP`` or ``IP:port`` (IPv6 in brackets) → the set of
    addresses and bare hosts a candidate may match (llm-d-router pkg/epp/framework/plugins/scheduling/test)."""
    out: set[str] = set()
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            out.add(f"{host}{rest}" if rest.startswith(":") else host)
        elif item.count(":") == 1:
            out.add(item)
        else:
            out.add(item)
    return frozenset(out)


class _Foreign:
    """An observation stream for a flight another scheduler replica owns (active-active): what the owner needs of
    the response, sent to it at the end (server/replication.py)."""

    __slots__ = ("key", "endpoint", "status", "prefill_ms", "first_wall", "chunks", "tail", "sent")

    def __init__(self, key: str, endpoint: Any) -> None:
        self.key = key
        self.endpoint = endpoint  # our own record of the picked pod (step-interval EWMA), or None
        self.status = 0
        self.prefill_ms = 0.0
        self.first_wall = 0.0
        self.chunks = 0
        self.tail = b""
        self.sent = False


_FOREIGN_TAIL_BYTES = 512  # enough for the usage block and [DONE]


class _Stream:
    __slots__ = ("headers", "path", "method", "body", "body_len", "flight", "messages", "observe", "served", "request_id", "sampled", "foreign",
                 "answered")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.path = ""
        self.method = ""
        self.body: list[bytes] = []
        self.body_len = 0
        self.flight: Flight | None = None
        self.messages = 0
        self.observe = False
        self.served: str | None = None
        self.request_id = ""
        self.sampled = True  # observability mode: this request also gets the observation stream
        self.foreign: _Foreign | None = None
        self.answered = False  # the routing answer (destination) was written to Envoy


class ExtProcHandler(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        pool: EndpointPool,
        scheduler: Scheduler,
        metrics: SchedulerMetrics,
        tracker: FlightTracker,
        settings: HandlerSettings | None = None,
        saturation: SaturationDetector | None = None,
        services: Services | None = None,
        flow: FlowController | None = None,
    ) -> None:
        self.flow = flow
        # override_message_timeout sent before a flow-control wait: the queue TTL (after which the request gets our
        # 503 queue_timeout) plus a second, within the cap Envoy is configured with (contract.MAX_MESSAGE_TIMEOUT_S)
        self.wait_extension_s = min(flow.cfg.queue_ttl_s + 1.0, MAX_MESSAGE_TIMEOUT_S) if flow is not None else 0.0
        if flow is not None and flow.cfg.enabled and flow.cfg.queue_ttl_s + 1.0 > MAX_MESSAGE_TIMEOUT_S:
            log.warning("flow-control queue TTL exceeds what Envoy lets a held request wait: Envoy ends the wait first",
                        extra={"queue_ttl_s": flow.cfg.queue_ttl_s, "max_message_timeout_s": MAX_MESSAGE_TIMEOUT_S})
        self.pool = pool
        self.scheduler = scheduler
        self.metrics = metrics
        self.tracker = tracker
        self.settings = settings or HandlerSettings()
        self.saturation = saturation or SaturationDetector()
        self.services = services if services is not None else Services()
        self._req_counters: dict[tuple[str, int], Any] = {}
        self.tokenizers = self.services.get(TOKENIZERS)
        # pods kept free of batch work (set by batch-reserve-filter when the config was loaded), or None
        self.reservation = self.services.get(BATCH_RESERVATION)
        self.sampler = ObservationSampler(self.settings.observe_budget)
        self.access_log: AccessLogReceiver | None = None  # set by the server when it serves the access-log service
        # observability mode: release a sampled flight whose observation stream never came (False with replicas:
        # the stream may have gone to another replica; the access log, forwarded to us, finishes the flight)
        self.release_orphans = True
        # end the routing stream right after the routing answer (observability mode with scheduler replicas; see
        # Process). Off by default: a hand-written Envoy config may still send response headers on this stream.
        self.close_after_route = False
        # active-active: send what an observation stream saw of another replica's flight to its owner
        # (SharedState.forward_observation); None: single replica
        self.forward_observation: Callable[[str, list[Any]], bool] | None = None
        self.foreign_observations = 0
        scraper = self.services.get(SCRAPER)
        # adaptive scraping: a pod we just sent a request to is scraped at the active rate again
        self._touch = scraper.touch if scraper is not None else None
        # headers a client may never set: the routing headers and those the profile handler sets upstream
        self._strip = tuple(dict.fromkeys(codec.ROUTING_HEADERS + (codec.HDR_OBSERVE,) + scheduler.owned_headers))

    # ------------------------------------------------------------------ gRPC entry point
    async def Process(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        """One ext_proc stream. Uses ``context.read()/write()`` rather than an async-generator servicer: grpc.aio
        wraps generators in extra machinery, and this loop is the per-request hot path."""
        st = _Stream()
        read, write = context.read, context.write
        eof = grpc.aio.EOF
        try:
            while True:
                req = await read()
                if req is eof:
                    return
                st.messages += 1
                if req.observability_mode:
                    st.observe = True
                    self._observe(st, req)
                    continue
                if st.messages > self.settings.max_messages_per_stream:
                    await write(codec.immediate(400, error_body("too many messages on one request stream", "invalid_request_error", "too_many_messages")))
                    return
                try:
                    resp = self._route_message(st, req)
                    if asyncio.iscoroutine(resp):  # only when the request must wait in flow control
                        if self.wait_extension_s > 0:
                            # the wait outlasts Envoy's message timeout (2 s, for a hung scheduler) on purpose:
                            # without this Envoy would answer 504 (fail-close) or route around flow control
                            # (fail-open) while the request still holds its place in the queue
                            await write(codec.extend_message_timeout(self.wait_extension_s))
                        resp = await resp
                except Exception as e:  # never crash the stream
                    log.exception("ext_proc handler error", extra={"request_id": st.request_id})
                    resp = self._reject(st, 500, f"internal scheduler error: {type(e).__name__}", "internal_error", "internal_error")
                if resp is not None:
                    await write(resp)
                    if st.flight is not None:
                        st.answered = True
                    if resp.HasField("immediate_response"):
                        return  # Envoy ends the request on an ImmediateResponse: nothing else belongs on this stream
                    if st.flight is not None and self.close_after_route:
                        # observability mode: the routing answer is the last message of this stream (Envoy sends it
                        # no response messages). Ending the call now (OK) tells Envoy that processing is complete,
                        # so a scheduler replica that dies later cannot fail the request (fail-close) mid-response.
                        return
        finally:
            self._stream_closed(st)

    # ------------------------------------------------------------------ routing stream
    def _route_message(self, st: _Stream, req: Any) -> Any:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._on_request_headers(st, req.request_headers)
        if kind == "request_body":
            return self._on_request_body(st, req.request_body)
        if kind == "response_headers":
            return self._on_response_headers(st, req.response_headers)
        if kind == "response_body":
            f = st.flight
            metadata = None
            if f is not None:
                f.on_body_chunk(req.response_body.body, time.monotonic())
                if req.response_body.end_of_stream:
                    if self.scheduler.reporters:
                        metadata = self._report(f)
                    self.tracker.finish(f, "ok" if f.obs.status < 400 else f"status_{f.obs.status}")
            return codec.response_body_continue(metadata)
        if kind == "request_trailers":
            return codec.request_trailers_continue()
        if kind == "response_trailers":
            f = st.flight
            if f is not None:
                self.tracker.finish(f, "ok" if f.obs.status < 400 else f"status_{f.obs.status}")
            return codec.response_trailers_continue()
        return None

    def _report(self, f: Flight) -> list[tuple[str, str, Any]] | None:
        """Response reporters' metadata from the response's last ``usage`` object (never raises)."""
        usage = usage_from_tail(f.tail)
        if usage is None:
            return None
        out: list[tuple[str, str, Any]] = []
        for r in self.scheduler.reporters:
            try:
                out += r.report(f.request, usage)
            except Exception:
                log.exception("response reporter failed", extra={"plugin": getattr(r, "name", "?")})
        return out or None

    def _on_request_headers(self, st: _Stream, rh: Any) -> Any:
        size = rh.ByteSize()
        st.headers = codec.headers_to_dict(rh.headers)
        st.path = st.headers.get(":path", "")
        st.method = st.headers.get(":method", "").upper()
        st.request_id = st.headers.get("x-request-id", "")
        if size > self.settings.max_header_bytes:
            return self._reject(st, 431, f"request headers of {size} bytes exceed the limit of {self.settings.max_header_bytes}", "invalid_request_error", "headers_too_large")
        for h in self._strip:
            st.headers.pop(h, None)
        if rh.end_of_stream:
            return self._on_bodyless(st)
        return codec.request_headers_continue(self._strip)

    def _on_bodyless(self, st: _Stream) -> Any:
        path = st.path.split("?", 1)[0].rstrip("/")
        if st.method in ("GET", "HEAD") and path in MODELS_PATHS:
            return self._models_response(st)
        if api_for_path(st.path) is not None:
            return self._reject(st, 400, "request body is empty; an inference request needs a JSON body", "invalid_request_error", "empty_body")
        return self._reject(st, 404, f"no route for {st.method or '?'} {path or '/'}: the gateway serves OpenAI inference paths and GET /v1/models", "invalid_request_error", "unknown_path")

    def _models_response(self, st: _Stream) -> Any:
        models = sorted(self.pool.served_models())
        now = int(time.time())
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "extproc"} for m in models]}).encode()
        self._count("", 200)
        return codec.immediate(200, body)

    def _on_request_body(self, st: _Stream, rb: Any) -> Any:
        chunk = rb.body
        if chunk:
            st.body_len += len(chunk)
            try:
                check_body_size(st.body_len, self.settings.max_body_bytes)
            except RequestError as e:
                return self._reject(st, e.status, e.message, e.type, e.code)
            st.body.append(chunk)
        if not rb.end_of_stream:
            return codec.request_body_continue()  # streamed/partial body: keep buffering
        raw = st.body[0] if len(st.body) == 1 else b"".join(st.body)
        st.body = []
        return self._schedule(st, raw)

    def _schedule(self, st: _Stream, raw: bytes) -> Any:
        t0 = time.perf_counter()
        try:
            request = parse_request(
                st.path,
                raw,
                st.headers,
                request_id=st.request_id or None,
                max_body_bytes=None,  # checked chunk by chunk in _on_request_body
                priority_of_objective=self.settings.objectives,
            )
        except RequestError as e:
            return self._reject(st, e.status, e.message, e.type, e.code)
        st.request_id = request.request_id
        err = model_error(self.pool, request)
        if err is not None:
            # counted without the name: a client-chosen model must not mint a metrics series per name
            return self._reject(st, err.status, err.message, err.error_type, err.code)
        if self.tokenizers:
            request.prompt_token_ids = self.tokenizers.tokenize(request)
        err = shed_error(self.pool, self.saturation, request, self.flow is not None and self.flow.waiting() > 0, self.reservation)
        if err is not None:
            return self._reject(st, err.status, err.message, err.error_type, err.code, model=request.target_model)
        if self.flow is not None and self.flow.must_wait(request):
            return self._wait_then_dispatch(st, request, t0)
        return self._dispatch(st, request, t0)

    async def _wait_then_dispatch(self, st: _Stream, request: Any, t0: float) -> Any:
        assert self.flow is not None
        try:
            await self.flow.wait(request)
        except SchedulingError as e:
            return self._reject(st, e.status, e.message, e.error_type, e.code, model=request.target_model)
        return self._dispatch(st, request, time.perf_counter())

    def _dispatch(self, st: _Stream, request: Any, t0: float) -> Any:
        model = request.target_model
        allowed = None
        if self.settings.conformance:
            sel = request.headers.get(codec.HDR_CONFORMANCE_SELECTION)
            if sel is not None:
                allowed = parse_endpoint_selection(sel)
        try:
            st.flight, result, _ = schedule_and_dispatch(self.scheduler, self.tracker, self.pool, request, allowed)
        except SchedulingError as e:
            return self._reject(st, e.status, e.message, e.error_type, e.code, model=model)
        targets = [ep.address for ep in result.targets]
        primary = result.primary
        st.served = primary.address
        if self._touch is not None:
            self._touch(primary)
        new_body = None
        if request.target_model != request.model:
            request.body["model"] = request.target_model
            new_body = json.dumps(request.body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = result.headers
        if request.sheddable:
            # the batch band's free slots after this admission (the tracker has counted this request): the batch
            # dispatcher sizes its concurrency from it instead of probing into 429s; pods kept free of batch
            # (batch-reserve-filter) have no batch slots
            free = self.saturation.headroom(batch_candidates(self.pool, model, self.reservation))
            if free is not None:
                headers = {**headers, codec.HDR_BATCH_HEADROOM: str(free)} if headers else {codec.HDR_BATCH_HEADROOM: str(free)}
        if self.settings.response_observe == "observability":
            al = self.access_log
            # no access log connected yet: observe everything (the only way the flight can finish)
            st.sampled = al is None or not al.active or self.sampler.sample()
            if st.sampled:
                st.flight.sampled = True
                headers = {**headers, codec.HDR_OBSERVE: "1"} if headers else _OBSERVE_HEADER
        resp = codec.route_response(targets, st.flight.key, from_body=True, body=new_body, headers=headers)
        self.metrics.decisions.observe(time.perf_counter() - t0)
        if self.flow is not None and self.flow.queued():
            self.flow.notify()  # chain releases one at a time, each after the previous one is dispatched
        return resp

    def _on_response_headers(self, st: _Stream, rh: Any) -> Any:
        f = st.flight
        status = 0
        for h in rh.headers.headers:
            if h.key == ":status":
                v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                status = int(v) if v.isascii() and v.isdigit() else 0
                break
        if f is not None:
            f.on_response_headers(status)
            self._count(f.request.target_model, status)
            if status >= 500 or status == 0:
                f.endpoint.note_upstream_failure()  # upstream trouble: evidence for the health logic
            if rh.end_of_stream or self.settings.response_observe == "none":
                self.tracker.finish(f, "ok" if 0 < status < 400 else f"status_{status}")
        return codec.response_headers_continue(st.served, self.settings.conformance)

    # ------------------------------------------------------------------ observation stream
    def _observe(self, st: _Stream, req: Any) -> None:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                rid = dest = ""
                for h in req.request_headers.headers.headers:
                    if h.key == codec.HDR_REQUEST_ID:
                        rid = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                    elif h.key == codec.HDR_DESTINATION:
                        dest = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                if rid:
                    st.flight = self.tracker.get(rid)
                    if st.flight is not None:
                        st.flight.observed = True
                    elif self.forward_observation is not None:
                        st.foreign = _Foreign(rid, self.pool.get(dest.split(",", 1)[0]) if dest else None)
            elif st.flight is None:
                if st.foreign is not None:
                    self._observe_foreign(st.foreign, kind, req)
                return
            elif kind == "response_headers":
                rh = req.response_headers
                if not st.flight.response_started:
                    status, pms = 0, 0.0
                    for h in rh.headers.headers:
                        if h.key == ":status":
                            v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                            status = int(v) if v.isascii() and v.isdigit() else 0
                        elif h.key == HDR_PREFILL_MS:
                            pms = _float_header(h)
                    st.flight.on_response_headers(status, pms)
                if rh.end_of_stream:
                    self._finish_observed(st.flight)
            elif kind == "response_body":
                rb = req.response_body
                st.flight.on_body_chunk(rb.body, time.monotonic())
                if rb.end_of_stream:
                    self._finish_observed(st.flight)
            elif kind == "response_trailers":
                self._finish_observed(st.flight)
        except Exception:
            log.exception("observation stream error", extra={"request_id": st.request_id})

    def _finish_observed(self, f: Flight) -> None:
        self.tracker.finish(f, observed_outcome(f))

    def _observe_foreign(self, fo: _Foreign, kind: str | None, req: Any) -> None:
        if fo.sent:
            return
        if kind == "response_headers":
            rh = req.response_headers
            for h in rh.headers.headers:
                if h.key == ":status":
                    v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                    fo.status = int(v) if v.isascii() and v.isdigit() else 0
                elif h.key == HDR_PREFILL_MS:
                    fo.prefill_ms = _float_header(h)
            if rh.end_of_stream:
                self._send_foreign(fo, "")
        elif kind == "response_body":
            rb = req.response_body
            data = rb.body
            if data:
                if fo.endpoint is not None:
                    observe_chunk(fo.endpoint, time.monotonic())  # our own step-interval estimate of that pod
                if not fo.first_wall:
                    fo.first_wall = time.time()
                fo.chunks += data.count(b"data: ")
                t = fo.tail + data
                fo.tail = t[-_FOREIGN_TAIL_BYTES:]
            if rb.end_of_stream:
                self._send_foreign(fo, "")
        elif kind == "response_trailers":
            self._send_foreign(fo, "")

    def _send_foreign(self, fo: _Foreign, outcome: str) -> None:
        """``[status, outcome, end_wall, upstream_failure, first_wall, prefill_ms, chunks, tail]`` to the owner;
        an empty outcome: the owner derives it as for its own observation (``observed_outcome``)."""
        fo.sent = True
        fwd = self.forward_observation
        if fwd is None:
            return
        failure = fo.status >= 500 or fo.status == 0
        if fwd(fo.key, [fo.status, outcome, time.time(), failure, fo.first_wall, fo.prefill_ms, fo.chunks, fo.tail]):
            self.foreign_observations += 1

    # ------------------------------------------------------------------ end of a stream
    def _stream_closed(self, st: _Stream) -> None:
        f = st.flight
        fo = st.foreign
        if fo is not None and not fo.sent:
            # the observation stream ended before the end of the response: client gone or upstream reset
            self._send_foreign(fo, "disconnected" if fo.status else "reset_before_response")
        if f is None or f.finished:
            return
        if not st.observe and not st.answered:
            # dispatched but the routing answer never reached Envoy (the stream was cancelled — client gone — while
            # the request waited in flow control, or the write failed): Envoy will not route it, and no access-log
            # entry will carry its key, so nothing else would ever end this flight
            self.tracker.finish(f, "reset_before_response")
            return
        if st.observe:
            # the observation stream ended before the end of the response: client gone or upstream reset
            self.tracker.finish(f, "disconnected" if f.response_started else "reset_before_response")
        elif self.settings.response_observe == "observability":
            # The routing stream may end right after the routing answer (Envoy sends it no response messages in
            # this mode); the observation stream finishes the flight. If it never attaches (the request was
            # reset before it reached the observation filter), release the flight after a grace period. A request
            # outside the observation sample is finished by its access-log entry (server/accesslog.py) — unless
            # Envoy ended it before applying our answer (no key header, so no entry: e.g. its message timer fired
            # as the answer was on its way). With one replica this stream stays open until the request ends, so
            # its close starts the same grace period for those; with replicas it ends right after the answer.
            if not f.observed and self.release_orphans and (st.sampled or not self.close_after_route):
                asyncio.get_running_loop().call_later(ORPHAN_GRACE_S, self._release_orphan, f)
        elif not f.response_started:
            # routing stream ended before any response headers: the request never reached a pod or was reset
            self.tracker.finish(f, "reset_before_response")
        else:
            # no observation stream carries this request: the routing stream's end is the request's end
            self.tracker.finish(f, "ok" if 0 < f.obs.status < 400 else f"status_{f.obs.status}")

    def _release_orphan(self, f: Flight) -> None:
        if not f.finished and not f.observed:
            self.tracker.finish(f, "reset_before_response")

    # ------------------------------------------------------------------ helpers
    def _reject(self, st: _Stream, status: int, message: str, type_: str, code: str, model: str = "") -> Any:
        self._count(model, status)
        if status >= 500 or status == 429:
            log.warning("request rejected", extra={"status": status, "code": code, "request_id": st.request_id, "model": model})
        else:
            log.info("request rejected", extra={"status": status, "code": code, "request_id": st.request_id})
        return codec.immediate(status, error_body(message, type_, code))

    def _count(self, model: str, status: int) -> None:
        key = (model, status)
        c = self._req_counters.get(key)
        if c is None:
            c = self._req_counters[key] = self.metrics.requests.labels(model, str(status))
        c.inc()


def observation_outcome_counter(metrics: SchedulerMetrics) -> Any:
    children: dict[str, Any] = {}

    def on_outcome(outcome: str) -> None:
        c = children.get(outcome)
        if c is None:
            c = children[outcome] = metrics.completions.labels(outcome)
        c.inc()

    return on_outcome


def record_observation(metrics: SchedulerMetrics, scheduler: Scheduler) -> Any:
    def on_complete(request: Any, obs: Observation) -> None:
        if obs.first_token_ts:
            metrics.ttft.labels(obs.model).observe(obs.ttft_ms / 1000.0)
        if obs.complete_ts:
            metrics.e2e.labels(obs.model).observe(obs.e2e_ms / 1000.0)
        if obs.output_tokens:
            metrics.output_tokens.labels(obs.model).inc(obs.output_tokens)
        scheduler.completed(request, obs)

    return on_complete
