"""The ext_proc state machine over real gRPC (no Envoy): routing answers, errors, accounting."""

import json

import grpc
import pytest

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.datalayer.endpoint import PodMetrics
from extproc.server.app import SchedulerServer, ServeOptions

PODS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def headers_msg(path, method="POST", end=False, extra=None, observe=False):
    req = pb.ProcessingRequest(observability_mode=observe)
    hs = req.request_headers.headers.headers
    for k, v in [(":path", path), (":method", method), (":authority", "gw"), *(extra or {}).items()]:
        h = hs.add()
        h.key = k
        h.raw_value = v.encode()
    req.request_headers.end_of_stream = end
    return req


def body_msg(data: bytes, end=True):
    req = pb.ProcessingRequest()
    req.request_body.body = data
    req.request_body.end_of_stream = end
    return req


def resp_headers_msg(status=200, observe=False, end=False):
    req = pb.ProcessingRequest(observability_mode=observe)
    h = req.response_headers.headers.headers.add()
    h.key = ":status"
    h.raw_value = str(status).encode()
    req.response_headers.end_of_stream = end
    return req


def resp_body_msg(data: bytes, end=False, observe=False):
    req = pb.ProcessingRequest(observability_mode=observe)
    req.response_body.body = data
    req.response_body.end_of_stream = end
    return req


@pytest.fixture(autouse=True)
def short_orphan_grace(monkeypatch):
    monkeypatch.setattr("extproc.server.handler.ORPHAN_GRACE_S", 0.05)


@pytest.fixture
async def server():
    s = SchedulerServer(
        ServeOptions(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, max_body_bytes=10_000, scrape_interval_s=3600)
    )
    await s.start()
    # pretend the pods were scraped: pod 2 is idle, others loaded
    for ep in s.pool.snapshot():
        ep.metrics = PodMetrics(waiting=0 if ep.port == 2 else 10, running=1, kv_usage=0.1 if ep.port == 2 else 0.9, updated_at=1e12)
    yield s
    await s.stop()


async def exchange(server, msgs, extensions=None):
    """Write ``msgs``, read each answer; ``extensions`` collects the override_message_timeout values (ms) seen."""
    extensions = extensions if extensions is not None else []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = pb_grpc.ExternalProcessorStub(ch)
        call = stub.Process()
        out = []
        for m in msgs:
            await call.write(m)
            if not m.observability_mode:
                r = await call.read()
                while r.WhichOneof("response") is None and r.HasField("override_message_timeout"):
                    extensions.append(r.override_message_timeout.ToMilliseconds())  # like Envoy: restart the timer
                    r = await call.read()
                out.append(r)
        await call.done_writing()
        await call.code()  # wait until the server has seen the end of the stream
        return out


def header_map(mutation):
    return {o.header.key: (o.header.raw_value or o.header.value.encode()).decode() for o in mutation.set_headers}


async def test_routes_to_best_pod_and_strips_spoofed_header(server):
    b = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode()
    out = await exchange(server, [headers_msg("/v1/completions", extra={"x-gateway-destination-endpoint": "6.6.6.6:1"}), body_msg(b)])
    assert "x-gateway-destination-endpoint" in out[0].request_headers.response.header_mutation.remove_headers
    hm = header_map(out[1].request_body.response.header_mutation)
    assert hm["x-gateway-destination-endpoint"] == "127.0.0.1:2"
    assert out[1].request_body.response.clear_route_cache
    md = out[1].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value
    assert md.split(",")[0] == "127.0.0.1:2"
    # the routing stream ended and no observation stream came: the flight is released after a grace
    import asyncio

    await asyncio.sleep(0.2)
    assert server.pool.get("127.0.0.1:2").inflight == 0


@pytest.mark.parametrize(
    "path,method,payload,status,code",
    [
        ("/v1/completions", "POST", b"{bad", 400, "invalid_json"),
        ("/v1/completions", "POST", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
        ("/v1/completions", "POST", json.dumps({"prompt": "x"}).encode(), 400, "missing_field"),
        ("/v1/chat/completions", "POST", json.dumps({"model": "m"}).encode(), 400, "missing_field"),
        ("/v1/completions", "POST", json.dumps({"model": "m", "prompt": "x" * 20_000}).encode(), 413, "request_too_large"),
    ],
)
async def test_errors_are_immediate_json(server, path, method, payload, status, code):
    out = await exchange(server, [headers_msg(path, method), body_msg(payload)])
    ir = out[-1].immediate_response
    assert ir.status.code == status
    err = json.loads(ir.body)["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert all(ep.inflight == 0 for ep in server.pool.snapshot())


async def test_bodyless_post_and_unknown_path(server):
    out = await exchange(server, [headers_msg("/v1/completions", end=True)])
    assert out[0].immediate_response.status.code == 400
    out = await exchange(server, [headers_msg("/admin", "GET", end=True)])
    assert out[0].immediate_response.status.code == 404


async def test_models_union(server):
    out = await exchange(server, [headers_msg("/v1/models", "GET", end=True)])
    ir = out[0].immediate_response
    assert ir.status.code == 200
    assert [m["id"] for m in json.loads(ir.body)["data"]] == ["m"]


async def test_no_healthy_pod_is_503(server):
    for ep in server.pool.snapshot():
        ep.healthy = False
    b = json.dumps({"model": "m", "prompt": "x"}).encode()
    out = await exchange(server, [headers_msg("/v1/completions"), body_msg(b)])
    assert out[-1].immediate_response.status.code == 503


async def test_sheddable_saturated_is_429(server):
    for ep in server.pool.snapshot():
        ep.metrics = PodMetrics(waiting=50, running=8, kv_usage=0.95, updated_at=__import__("time").monotonic())
    b = json.dumps({"model": "m", "prompt": "x"}).encode()
    out = await exchange(server, [headers_msg("/v1/completions", extra={"x-gateway-inference-priority": "-1"}), body_msg(b)])
    assert out[-1].immediate_response.status.code == 429
    # non-sheddable traffic is still routed
    out = await exchange(server, [headers_msg("/v1/completions"), body_msg(b)])
    assert out[-1].WhichOneof("response") == "request_body"


async def open_routing(server, b):
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    call = pb_grpc.ExternalProcessorStub(ch).Process()
    await call.write(headers_msg("/v1/completions"))
    await call.read()
    await call.write(body_msg(b))
    out = await call.read()
    return ch, call, header_map(out.request_body.response.header_mutation)["x-extproc-request-id"]


async def test_observation_stream_finishes_flight(server):
    b = json.dumps({"model": "m", "prompt": "hello", "stream": True, "max_tokens": 2}).encode()
    ch, call, rid = await open_routing(server, b)
    ep = server.pool.get("127.0.0.1:2")
    assert ep.inflight == 1 and ep.inflight_prefill_tokens > 0
    await call.write(resp_headers_msg(200))
    served = await call.read()
    assert header_map(served.response_headers.response.header_mutation)["x-gateway-destination-endpoint-served"] == "127.0.0.1:2"
    sse = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    await exchange(
        server,
        [
            headers_msg("/v1/completions", extra={"x-extproc-request-id": rid}, observe=True),
            resp_headers_msg(200, observe=True),
            resp_body_msg(sse[:40], observe=True),
            resp_body_msg(sse[40:], end=True, observe=True),
        ],
    )
    assert ep.inflight == 0 and ep.inflight_prefill_tokens == 0 and ep.inflight_decode_tokens == 0
    assert len(server.tracker) == 0
    await call.done_writing()
    await ch.close()
    text = server.metrics.exposition().decode()
    assert 'extproc_request_completions_total{outcome="ok"} 1.0' in text
    assert 'extproc_output_tokens_total{model="m"} 2.0' in text


async def test_reused_client_request_id_keeps_two_flights(server):
    """Two requests with the same client x-request-id are two flights with scheduler-drawn keys: neither
    supersedes the other, and observing one finishes only that one."""
    b = json.dumps({"model": "m", "prompt": "hello", "stream": True, "max_tokens": 2}).encode()
    opened = []
    for _ in range(2):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        call = pb_grpc.ExternalProcessorStub(ch).Process()
        await call.write(headers_msg("/v1/completions", extra={"x-request-id": "same-id"}))
        await call.read()
        await call.write(body_msg(b))
        out = await call.read()
        opened.append((ch, call, header_map(out.request_body.response.header_mutation)["x-extproc-request-id"]))
    keys = [k for _, _, k in opened]
    assert keys[0] != keys[1] and "same-id" not in keys
    assert len(server.tracker) == 2 and sum(ep.inflight for ep in server.pool.snapshot()) == 2
    # a client guessing the id it sent gets no flight
    assert server.tracker.get("same-id") is None
    sse = b'data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]\n\n'
    await exchange(
        server,
        [
            headers_msg("/v1/completions", extra={"x-extproc-request-id": keys[1]}, observe=True),
            resp_headers_msg(200, observe=True),
            resp_body_msg(sse, end=True, observe=True),
        ],
    )
    assert len(server.tracker) == 1 and server.tracker.get(keys[0]) is not None
    assert sum(ep.inflight for ep in server.pool.snapshot()) == 1
    text = server.metrics.exposition().decode()
    assert 'outcome="superseded"' not in text
    for ch, call, _ in opened:
        await call.done_writing()
        await ch.close()


async def test_observation_stream_cut_counts_disconnect(server):
    b = json.dumps({"model": "m", "prompt": "hello", "stream": True}).encode()
    ch, call, rid = await open_routing(server, b)
    await call.write(resp_headers_msg(200))
    await call.read()
    await exchange(server, [headers_msg("/v1/completions", extra={"x-extproc-request-id": rid}, observe=True), resp_headers_msg(200, observe=True), resp_body_msg(b"data: {}\n\n", observe=True)])
    assert all(ep.inflight == 0 for ep in server.pool.snapshot())
    text = server.metrics.exposition().decode()
    assert 'extproc_request_completions_total{outcome="disconnected"} 1.0' in text
    await call.done_writing()
    await ch.close()


async def test_routing_stream_reset_before_response_frees_pod(server):
    b = json.dumps({"model": "m", "prompt": "hello"}).encode()
    ch, call, rid = await open_routing(server, b)
    assert server.pool.get("127.0.0.1:2").inflight == 1
    call.cancel()
    await ch.close()
    import asyncio

    for _ in range(100):
        if server.pool.get("127.0.0.1:2").inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert server.pool.get("127.0.0.1:2").inflight == 0


FLOW_CONFIG = """
plugins:
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 1
saturationDetector:
  metricsStalenessThresholdSeconds: 3600
flowControl:
  enabled: true
  queueTtlSeconds: 5
"""


@pytest.fixture
async def flow_server(tmp_path):
    """A scheduler with flow control on and every pod saturated (fresh metrics)."""
    import time

    cfg = tmp_path / "fc.yaml"
    cfg.write_text(FLOW_CONFIG)
    s = SchedulerServer(ServeOptions(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600, config=str(cfg)))
    await s.start()
    for ep in s.pool.snapshot():
        ep.metrics = PodMetrics(waiting=50, kv_usage=0.95, updated_at=time.monotonic())
    yield s
    await s.stop()


async def test_flow_control_queues_until_capacity(flow_server):
    import asyncio
    import time

    s = flow_server
    b = json.dumps({"model": "m", "prompt": "x"}).encode()
    ext: list[int] = []
    task = asyncio.create_task(exchange(s, [headers_msg("/v1/completions"), body_msg(b)], ext))
    await asyncio.sleep(0.3)
    assert not task.done() and s.flow.queued() == 1  # waiting, not rejected
    # before waiting, Envoy's message timer was extended to the queue TTL (5 s) + 1 s
    assert ext == [6000]
    s.pool.get("127.0.0.1:3").metrics = PodMetrics(waiting=0, kv_usage=0.1, updated_at=time.monotonic())
    out = await asyncio.wait_for(task, 5)
    assert header_map(out[-1].request_body.response.header_mutation)["x-gateway-destination-endpoint"] == "127.0.0.1:3"
    # a request that does not wait gets no extension
    s.pool.get("127.0.0.1:3").metrics = PodMetrics(waiting=0, kv_usage=0.1, updated_at=time.monotonic())
    out = await exchange(s, [headers_msg("/v1/completions"), body_msg(b)], ext)
    assert ext == [6000] and out[-1].WhichOneof("response") == "request_body"
    # sheddable traffic is never queued: 429 at once while saturated
    s.pool.get("127.0.0.1:3").metrics = PodMetrics(waiting=50, kv_usage=0.95, updated_at=time.monotonic())
    out = await exchange(s, [headers_msg("/v1/completions", extra={"x-gateway-inference-priority": "-1"}), body_msg(b)])
    assert out[-1].immediate_response.status.code == 429


async def test_sheddable_is_shed_while_interactive_waits_in_queue(flow_server):
    import asyncio
    import time

    s = flow_server
    b = json.dumps({"model": "m", "prompt": "x"}).encode()
    waiting = asyncio.create_task(exchange(s, [headers_msg("/v1/completions"), body_msg(b)]))
    await asyncio.sleep(0.2)
    assert s.flow.queued() == 1
    # capacity appears, but the queued interactive request has not been released yet: batch must not take it
    s.flow.notify = lambda: None  # freeze releases for the check
    s.pool.get("127.0.0.1:1").metrics = PodMetrics(waiting=0, kv_usage=0.1, updated_at=time.monotonic())
    out = await exchange(s, [headers_msg("/v1/completions", extra={"x-gateway-inference-priority": "-1"}), body_msg(b)])
    assert out[-1].immediate_response.status.code == 429
    del s.flow.notify
    s.flow.notify()
    out = await asyncio.wait_for(waiting, 5)
    assert out[-1].WhichOneof("response") == "request_body"


class _PeerHeaderHandler:
    """Two profiles; 'main' is primary, the pick of 'peer' travels upstream in x-test-peer-host-port."""

    type_name = "test-peer-header-handler"
    owned_headers = ("x-test-peer-host-port",)

    def __init__(self, name="test-peer-header-handler"):
        self.name = name

    def configure(self, profiles):
        pass

    def pick_profiles(self, cycle, request, profiles, results):
        return [p for n, p in profiles.items() if n not in results][:1]

    def process_results(self, cycle, request, results):
        from extproc.plugin import SchedulingResult

        return SchedulingResult({"main": results["main"], "peer": results["peer"]}, "main", {"x-test-peer-host-port": results["peer"].targets[0].address})


@pytest.fixture
async def peer_server(tmp_path):
    from extproc.scheduling import registry

    saved = dict(registry.PLUGIN_TYPES)
    registry.load_builtin_plugins()
    registry.register(_PeerHeaderHandler)
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        """
plugins:
- type: test-peer-header-handler
- type: queue-scorer
- type: label-selector-filter
  name: peers
  parameters: {matchLabels: {role: peer}}
schedulingProfiles:
- name: main
  plugins: [{pluginRef: queue-scorer}]
- name: peer
  plugins: [{pluginRef: peers}]
"""
    )
    s = SchedulerServer(
        ServeOptions(endpoints=PODS, labels={"127.0.0.1:3": {"role": "peer"}}, models=["m"], config=str(cfg), host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600)
    )
    await s.start()
    for ep in s.pool.snapshot():
        ep.metrics = PodMetrics(waiting=0 if ep.port == 2 else 10, updated_at=1e12)
    yield s
    await s.stop()
    registry.PLUGIN_TYPES.clear()
    registry.PLUGIN_TYPES.update(saved)


async def test_profile_handler_headers_are_set_and_client_copies_stripped(peer_server):
    b = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode()
    spoof = {"x-test-peer-host-port": "6.6.6.6:1", "x-gateway-destination-endpoint": "6.6.6.6:1"}
    out = await exchange(peer_server, [headers_msg("/v1/completions", extra=spoof), body_msg(b)])
    removed = list(out[0].request_headers.response.header_mutation.remove_headers)
    assert "x-test-peer-host-port" in removed and "x-gateway-destination-endpoint" in removed
    hm = header_map(out[1].request_body.response.header_mutation)
    assert hm["x-gateway-destination-endpoint"] == "127.0.0.1:2"
    assert hm["x-test-peer-host-port"] == "127.0.0.1:3"


async def test_unknown_model_names_do_not_mint_metric_series(server):
    for i in range(50):
        out = await exchange(server, [headers_msg("/v1/completions"), body_msg(json.dumps({"model": f"nope-{i}", "prompt": "x"}).encode())])
        assert out[-1].immediate_response.status.code == 404
    text = server.metrics.exposition().decode()
    assert "nope-" not in text
    assert 'extproc_requests_total{model="",status="404"} 50.0' in text


@pytest.mark.parametrize("conformance", [False, True])
async def test_conformance_header_only_in_conformance_mode(conformance):
    s = SchedulerServer(
        ServeOptions(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600, conformance=conformance)
    )
    await s.start()
    try:
        for ep in s.pool.snapshot():
            ep.metrics = PodMetrics(waiting=0 if ep.port == 2 else 10, updated_at=1e12)
        b = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode()
        out = await exchange(s, [headers_msg("/v1/completions", extra={"test-epp-endpoint-selection": "127.0.0.1:3, 10.9.9.9"}), body_msg(b), resp_headers_msg(200, end=True)])
        hm = header_map(out[1].request_body.response.header_mutation)
        rh = header_map(out[2].response_headers.response.header_mutation)
        if conformance:
            assert hm["x-gateway-destination-endpoint"] == "127.0.0.1:3"  # restricted although pod 2 is idle
            assert rh["x-conformance-test-served-endpoint"] == "127.0.0.1:3"
        else:
            assert hm["x-gateway-destination-endpoint"] == "127.0.0.1:2"  # the header is ignored
            assert "x-conformance-test-served-endpoint" not in rh
        if conformance:
            out = await exchange(s, [headers_msg("/v1/completions", extra={"test-epp-endpoint-selection": "10.9.9.9"}), body_msg(b)])
            assert out[1].immediate_response.status.code == 503
    finally:
        await s.stop()


REPORTER_CFG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: cost
  type: request-attribute-reporter
  parameters:
    attributes:
    - key: {namespace: envoy.lb, name: x-gateway-inference-request-cost}
      expression: usage.prompt_tokens + 2 * usage.completion_tokens
      condition: has(usage.completion_tokens)
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""


async def test_request_attribute_reporter_returns_dynamic_metadata(tmp_path):
    cfg = tmp_path / "cost.yaml"
    cfg.write_text(REPORTER_CFG)
    opts = dict(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600, config=str(cfg))
    from extproc.scheduling.config import ConfigError

    with pytest.raises(ConfigError, match="response-observe streamed"):
        SchedulerServer(ServeOptions(**opts)).load()  # observability mode cannot return metadata on the body
    s = SchedulerServer(ServeOptions(**opts, response_observe="streamed"))
    await s.start()
    try:
        b = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode()
        body = json.dumps({"id": "x", "choices": [{"text": "abc"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()
        out = await exchange(s, [headers_msg("/v1/completions"), body_msg(b), resp_headers_msg(200), resp_body_msg(body[:20]), resp_body_msg(body[20:], end=True)])
        assert not out[3].HasField("dynamic_metadata")
        md = out[4].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-inference-request-cost"]
        assert md.number_value == 11  # 5 + 2 × 3
        # condition false (no completion tokens): nothing reported
        body2 = json.dumps({"usage": {"prompt_tokens": 5}}).encode()
        out = await exchange(s, [headers_msg("/v1/completions"), body_msg(b), resp_headers_msg(200), resp_body_msg(body2, end=True)])
        assert "envoy.lb" not in out[3].dynamic_metadata.fields
    finally:
        await s.stop()


def test_usage_from_sse_tail():
    from extproc.server.handler import usage_from_tail

    sse = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    assert usage_from_tail(sse) == {"prompt_tokens": 4, "completion_tokens": 2}
    assert usage_from_tail(b"data: [DONE]") is None
    assert usage_from_tail(b'{"usage": null, "x": {"usage": {"prompt_tokens": 1}}}') == {"prompt_tokens": 1}


async def test_flight_whose_routing_answer_never_reaches_envoy_is_released():
    """A request dispatched while its stream is already gone (the client left while it waited in flow control; the
    write of the routing answer fails): with the access log active and the request outside the observation sample,
    nothing else would end the flight — the pod's in-flight count would leak."""
    import asyncio

    s = SchedulerServer(ServeOptions(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600))
    await s.start()
    try:
        h = s.handler
        h.access_log.ever_connected = True  # the access log ends unsampled requests …
        h.sampler.rate = 0.0  # … and this one is not sampled
        msgs = [headers_msg("/v1/completions"), body_msg(json.dumps({"model": "m", "prompt": "hello"}).encode())]

        class Ctx:
            def __init__(self):
                self.q = list(msgs)

            async def read(self):
                return self.q.pop(0) if self.q else grpc.aio.EOF

            async def write(self, resp):
                if resp.HasField("request_body"):
                    raise asyncio.CancelledError()  # the stream was cancelled under us

        with pytest.raises(asyncio.CancelledError):
            await h.Process(None, Ctx())
        assert sum(ep.inflight for ep in s.pool.snapshot()) == 0 and len(s.tracker) == 0
    finally:
        await s.stop()
