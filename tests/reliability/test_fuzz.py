"""Hostile input: property tests of the request parser and of the ext_proc handler over real gRPC, and a set of
nasty bodies through real Envoy.

Properties:
- ``parse_request`` either returns a request or raises ``RequestError`` with a 4xx status; nothing else escapes,
  and it returns (pytest-timeout catches a hang).
- The handler answers every message with a well-formed ``ProcessingResponse`` of the matching kind, an
  ImmediateResponse is 4xx/5xx with an OpenAI JSON error (200 only for ``GET /v1/models``), nothing leaks in the
  in-flight accounting, the server never crashes, and a valid request right after still routes.
"""

from __future__ import annotations

import asyncio
import json
import string
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import aiohttp
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.api import InferenceRequest, RequestError, parse_request
from extproc.datalayer.endpoint import PodMetrics
from extproc.harness import Stack, StackSpec
from extproc.server import codec
from extproc.server.app import SchedulerServer, ServeOptions

from reliability_lib import MODEL, error_of, post

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
CONTROL_HEADERS = [
    "x-gateway-inference-priority",
    "x-gateway-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-gateway-model-name-rewrite",
    "x-slo-ttft-ms",
    "x-slo-tpot-ms",
    "x-request-id",
]
FIELDS = ["model", "prompt", "messages", "input", "stream", "stream_options", "max_tokens", "max_completion_tokens", "max_output_tokens", "instructions"]

# --------------------------------------------------------------------------------------------- strategies
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=10), c, max_size=5)), max_leaves=30)


def _valid_body(api_path: str, prompt: str) -> dict[str, Any]:
    if api_path.endswith("/chat/completions"):
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt or "x"}], "max_tokens": 4}
    if api_path.endswith("/completions"):
        return {"model": MODEL, "prompt": prompt or "x", "max_tokens": 4}
    return {"model": MODEL, "input": prompt or "x"}


@st.composite
def hostile_bodies(draw: st.DrawFn, huge_kb: int = 3072) -> bytes:
    kind = draw(st.sampled_from(["random", "json", "typed", "truncated", "nested", "non_utf8", "huge", "valid"]))
    path = draw(st.sampled_from(PATHS))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "typed":  # the right keys with arbitrary (mostly wrong) types
        return json.dumps(draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))).encode()
    valid = json.dumps(_valid_body(path, draw(st.text(max_size=200)))).encode()
    if kind == "truncated":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if kind == "nested":
        depth = draw(st.integers(1, min(200_000, huge_kb * 1024 // 25)))  # ≤ 25 bytes per level: stays under huge_kb
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"model":"m","prompt":', "}")]))
        closed = draw(st.booleans())
        return (opener * depth + "1" + (closer * depth if closed else "")).encode()
    if kind == "non_utf8":
        pos = draw(st.integers(0, len(valid)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x00"]))
        return valid[:pos] + junk + valid[pos:]
    if kind == "huge":
        n = draw(st.integers(1, huge_kb)) * 1024
        return b'{"model":"' + MODEL.encode() + b'","prompt":"' + b"a" * n + b'"}'
    return valid


header_values = st.one_of(st.text(max_size=30), st.sampled_from(["-1", "0", "1e9999", "nan", "inf", "-0", "²", "٣", "9" * 5000, " 1 "]))
hostile_headers = st.dictionaries(st.one_of(st.sampled_from(CONTROL_HEADERS), st.text(string.ascii_lowercase + "-", min_size=1, max_size=20)), header_values, max_size=8)
hostile_paths = st.one_of(st.sampled_from(PATHS), st.sampled_from([p + "?x=1" for p in PATHS]), st.text(max_size=40))


def _check_outcome(path: str, raw: bytes, headers: dict[str, str], max_body: int) -> str:
    try:
        req = parse_request(path, raw, headers, max_body_bytes=max_body, priority_of_objective={"batch": -1})
    except RequestError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        err = json.loads(e.body())["error"]
        assert err["message"] and err["type"] and err["code"]
        return f"{e.status}:{e.code}"
    assert isinstance(req, InferenceRequest)
    assert isinstance(req.model, str) and req.model
    assert isinstance(req.prompt_text, str)
    assert req.prompt_tokens_estimate >= 1
    assert req.max_tokens is None or (isinstance(req.max_tokens, int) and req.max_tokens >= 0)
    return "ok"


FUZZ_SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@FUZZ_SETTINGS
@given(path=hostile_paths, raw=hostile_bodies(), headers=hostile_headers)
def test_parse_request_only_raises_request_error(path: str, raw: bytes, headers: dict[str, str]) -> None:
    _check_outcome(path, raw, headers, 8 * 1024 * 1024)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=hostile_bodies(), limit=st.integers(0, 4096))
def test_parse_request_body_limit(raw: bytes, limit: int) -> None:
    outcome = _check_outcome("/v1/completions", raw, {}, limit)
    if len(raw) > limit:
        assert outcome.startswith("413:")


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 1_000_000,
        b'{"model":"m","prompt":' + b"[" * 500_000 + b"]" * 500_000 + b"}",
        b'{"model":"m","messages":[{"role":"user","content":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        b'{"model":"m","prompt":"' + "é".encode() * 2_000_000 + b'"}',
        b'{"model":"m","prompt":[' + b"1," * 1_000_000 + b"1]}",
        b'{"model":"m","prompt":"x","max_tokens":' + b"9" * 100_000 + b"}",
        "\ufeff".encode() + b'{"model":"m","prompt":"x"}',
        '{"model":"m","prompt":"x"}'.encode("utf-16"),
        b'{"model":"m","model":5,"prompt":"x"}',
    ],
    ids=["deep-array", "deep-prompt", "deep-content", "4MB-utf8", "1M-token-ids", "100k-digit-int", "bom", "utf16", "dup-key"],
)
def test_parse_request_pathological(raw: bytes) -> None:
    _check_outcome("/v1/completions" if b"messages" not in raw else "/v1/chat/completions", raw, {}, 8 * 1024 * 1024)


# --------------------------------------------------------------------------------------------- handler over real gRPC
PODS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


class ServerThread:
    """A SchedulerServer on its own event loop thread, so synchronous hypothesis tests can drive it over gRPC."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.server = SchedulerServer(
            ServeOptions(
                endpoints=PODS, models=[MODEL], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0,
                max_body_bytes=1024 * 1024, scrape_interval_s=3600, unhealthy_after=1_000_000,
                # the routing stream carries the whole request, so its end releases the flight at once and the
                # leak check below is exact (observability mode keeps an unobserved flight for ORPHAN_GRACE_S)
                response_observe="streamed",
            )
        )  # fmt: skip

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self.server.start())

        async def fake_metrics() -> None:
            for ep in self.server.pool.snapshot():
                ep.metrics = PodMetrics(waiting=0, running=1, kv_usage=0.1, updated_at=1e12)

        self.call(fake_metrics())

    def stop(self) -> None:
        try:
            self.call(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def leaks(self) -> tuple[int, list[int]]:
        async def read() -> tuple[int, list[int]]:
            assert self.server.tracker is not None
            return len(self.server.tracker), [ep.inflight for ep in self.server.pool.snapshot()]

        return self.call(read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    s = ServerThread()
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stub(srv: ServerThread) -> Iterator[pb_grpc.ExternalProcessorStub]:
    opts = [("grpc.max_send_message_length", 8 * 1024 * 1024), ("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    with grpc.insecure_channel(f"127.0.0.1:{srv.server.grpc_port}", options=opts) as ch:
        yield pb_grpc.ExternalProcessorStub(ch)


def _headers_msg(pairs: list[tuple[str, bytes | str]], end: bool, observe: bool) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(observability_mode=observe)
    hs = req.request_headers.headers.headers
    for k, v in pairs:
        h = hs.add()
        h.key = k
        if isinstance(v, bytes):
            h.raw_value = v
        else:
            h.value = v
    req.request_headers.end_of_stream = end
    return req


safe_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
header_keys = st.one_of(
    st.sampled_from([":path", ":method", ":authority", ":status", "content-type", "x-extproc-request-id", "x-gateway-destination-endpoint", *CONTROL_HEADERS]),
    safe_text,
)
header_vals: st.SearchStrategy[bytes | str] = st.one_of(
    st.binary(max_size=60),
    safe_text,
    st.sampled_from([b"/v1/completions", b"/v1/chat/completions", b"/v1/models", b"POST", b"GET", b"-1", b"200", b"\xff\xfe"]),
    st.integers(1, 120_000).map(lambda n: b"h" * n),  # occasionally over the 64 KiB header limit
)
header_lists = st.lists(st.tuples(header_keys, header_vals), max_size=12)


@st.composite
def messages(draw: st.DrawFn) -> pb.ProcessingRequest:
    observe = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False
    kind = draw(st.sampled_from(["rh", "rh_path", "rb", "rtr", "sh", "sb", "str", "empty"]))
    if kind == "rh":
        return _headers_msg(draw(header_lists), draw(st.booleans()), observe)
    if kind == "rh_path":  # a plausible request with random extra headers
        path = draw(st.sampled_from([*PATHS, "/v1/models", "/admin"]))
        pairs: list[tuple[str, bytes | str]] = [(":path", path.encode()), (":method", draw(st.sampled_from([b"POST", b"GET", b"PUT"])))]
        return _headers_msg(pairs + draw(header_lists), draw(st.booleans()), observe)
    req = pb.ProcessingRequest(observability_mode=observe)
    if kind == "rb":
        req.request_body.body = draw(hostile_bodies(huge_kb=1200))  # below the server's gRPC message limit
        req.request_body.end_of_stream = draw(st.booleans())
    elif kind == "rtr":
        req.request_trailers.SetInParent()
    elif kind == "sh":
        h = req.response_headers.headers.headers.add()
        h.key = ":status"
        h.raw_value = draw(st.one_of(st.sampled_from([b"200", b"500", b"503", b"0", b"", b"abc", "²".encode(), "٣".encode()]), st.binary(max_size=8)))
        req.response_headers.end_of_stream = draw(st.booleans())
    elif kind == "sb":
        req.response_body.body = draw(st.one_of(st.binary(max_size=200), st.just(b'data: {"usage":{"completion_tokens":7}}\n\ndata: [DONE]\n\n')))
        req.response_body.end_of_stream = draw(st.booleans())
    elif kind == "str":
        req.response_trailers.SetInParent()
    return req


EXPECTED_KIND = {
    "request_headers": {"request_headers", "immediate_response"},
    "request_body": {"request_body", "immediate_response"},
    "request_trailers": {"request_trailers"},
    "response_headers": {"response_headers", "immediate_response"},
    "response_body": {"response_body"},
    "response_trailers": {"response_trailers"},
}


def test_response_headers_answer_without_pick_is_well_formed() -> None:
    """Regression (found by the fuzz test): a bare CONTINUE for response headers must still set its oneof."""
    assert codec.response_headers_continue(None).WhichOneof("response") == "response_headers"


def _valid_exchange(stub: pb_grpc.ExternalProcessorStub) -> str:
    msgs = [
        _headers_msg([(":path", b"/v1/completions"), (":method", b"POST")], False, False),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode(), end_of_stream=True)),
    ]
    out = list(stub.Process(iter(msgs), timeout=20))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"], out
    hm = {o.header.key: o.header.raw_value.decode() for o in out[1].request_body.response.header_mutation.set_headers}
    return hm["x-gateway-destination-endpoint"]


def _check_responses(msgs: list[pb.ProcessingRequest], out: list[pb.ProcessingResponse]) -> None:
    answered = [m for m in msgs if not m.observability_mode and m.WhichOneof("request") is not None]
    assert len(out) <= len(answered)
    for i, r in enumerate(out):
        kind = r.WhichOneof("response")
        req_kind = answered[i].WhichOneof("request")
        assert kind in EXPECTED_KIND[req_kind], (req_kind, kind)
        if kind == "immediate_response":
            assert i == len(out) - 1, "the stream must end after an ImmediateResponse"
            code = r.immediate_response.status.code
            if code == 200:
                body = json.loads(r.immediate_response.body)
                assert body["object"] == "list"
            else:
                assert 400 <= code < 600, code
                error_of(r.immediate_response.body)
        elif kind == "request_body" and r.request_body.response.header_mutation.set_headers:
            hm = {o.header.key: o.header.raw_value.decode() for o in r.request_body.response.header_mutation.set_headers}
            assert hm["x-gateway-destination-endpoint"] in PODS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(messages(), max_size=10))
def test_handler_survives_random_streams(srv: ServerThread, stub: pb_grpc.ExternalProcessorStub, msgs: list[pb.ProcessingRequest]) -> None:
    try:
        out = list(stub.Process(iter(msgs), timeout=20))
    except grpc.RpcError as e:
        pytest.fail(f"the stream failed instead of answering: {e.code()} {e.details()}")
    _check_responses(msgs, out)
    assert srv.leaks() == (0, [0, 0, 0])
    assert _valid_exchange(stub) in PODS
    assert srv.leaks() == (0, [0, 0, 0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=512), min_size=2, max_size=200), prompt=st.text(min_size=1, max_size=300))
def test_handler_many_body_chunks(srv: ServerThread, stub: pb_grpc.ExternalProcessorStub, chunks: list[bytes], prompt: str) -> None:
    """A valid body split in many chunks routes; random chunks get a 4xx JSON error; either way nothing leaks."""
    valid = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
    for body_chunks in (chunks, [valid[i : i + 7] for i in range(0, len(valid), 7)]):
        msgs = [_headers_msg([(":path", b"/v1/completions"), (":method", b"POST")], False, False)]
        msgs += [pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(body_chunks) - 1)) for i, c in enumerate(body_chunks)]
        out = list(stub.Process(iter(msgs), timeout=20))
        _check_responses(msgs, out)
        last = out[-1]
        if body_chunks is not chunks:
            assert last.WhichOneof("response") == "request_body" and last.request_body.response.header_mutation.set_headers
        assert srv.leaks() == (0, [0, 0, 0])


def test_handler_concurrent_streams_with_resets(srv: ServerThread, stub: pb_grpc.ExternalProcessorStub) -> None:
    """Streams cancelled by the client at every step (Envoy resets) leave no in-flight request behind."""
    body = json.dumps({"model": MODEL, "prompt": "p", "max_tokens": 2}).encode()
    for cut in range(1, 5):
        for _ in range(10):
            msgs = [
                _headers_msg([(":path", b"/v1/completions"), (":method", b"POST")], False, False),
                pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
                pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
                pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: x\n\n", end_of_stream=False)),
            ][:cut]
            call = stub.Process(iter(msgs), timeout=20)
            got = 0
            for _ in call:
                got += 1
                if got == cut:
                    break
            call.cancel()
    for _ in range(200):
        if srv.leaks() == (0, [0, 0, 0]):
            break
        threading.Event().wait(0.02)
    assert srv.leaks() == (0, [0, 0, 0])
    assert _valid_exchange(stub) in PODS


# --------------------------------------------------------------------------------------------- through real Envoy
NASTY: list[tuple[str, str, bytes]] = [
    ("non-utf8", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":"\xff\xfe\xfa"}'),
    ("5MB-junk", "/v1/completions", b"{" + b"\x00\xff" * (5 * 512 * 1024)),
    ("5MB-wrong-type", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":[' + b'"a",1,' * (5 * 1024 * 1024 // 6) + b'"a"]}'),
    ("deeply-nested", "/v1/completions", b"[" * 200_000 + b"]" * 200_000),
    ("nested-prompt", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("model-not-string", "/v1/completions", b'{"model":["' + MODEL.encode() + b'"],"prompt":"x"}'),
    ("messages-string", "/v1/chat/completions", b'{"model":"' + MODEL.encode() + b'","messages":"hi"}'),
    ("max-tokens-string", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":"x","max_tokens":"5"}'),
    ("stream-int", "/v1/completions", b'{"model":"' + MODEL.encode() + b'","prompt":"x","stream":1}'),
    ("body-array", "/v1/chat/completions", b"[]"),
    ("truncated", "/v1/chat/completions", b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","con'),
]


@pytest.mark.envoy
async def test_nasty_bodies_through_envoy(fleet: Any) -> None:
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL])) as stk, aiohttp.ClientSession() as s:
        for name, path, raw in NASTY:
            status, _, data = await post(s, stk.url, path, raw)
            assert 400 <= status < 500, (name, status, data[:200])
            error_of(data)
            status2, headers2, _ = await post(s, stk.url, "/v1/completions", {"model": MODEL, "prompt": f"after {name}", "max_tokens": 2})
            assert status2 == 200, name
            assert headers2["x-inference-pod"] in fleet.endpoints
        # a bad priority header is a 400 too, and the scheduler process is still alive at the end
        status, _, data = await post(s, stk.url, "/v1/completions", {"model": MODEL, "prompt": "x"}, {"x-gateway-inference-priority": "high"})
        assert status == 400 and error_of(data)["code"] == "invalid_header"
        assert stk.scheduler is not None and stk.scheduler.proc.returncode is None


@pytest.mark.envoy
async def test_body_between_grpc_and_envoy_limits_gets_json_413(fleet: Any) -> None:
    limit = 4 * 1024 * 1024  # gRPC limit 5 MiB, Envoy's buffer 8 MiB
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], max_body_bytes=limit)) as stk, aiohttp.ClientSession() as s:
        raw = json.dumps({"model": MODEL, "prompt": "a" * (6 * 1024 * 1024)}).encode()
        status, _, data = await post(s, stk.url, "/v1/completions", raw)
        assert status == 413 and error_of(data)["code"] == "request_too_large"
