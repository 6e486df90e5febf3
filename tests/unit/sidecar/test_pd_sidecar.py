"""The decode-side P/D sidecar against simulated vLLM pods (NixlConnector field names) and scripted upstreams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.netutil import HostPort, parse_host_port
from extproc.sidecar.pd import PREFILL_HEADER, PDSidecar, SidecarSettings, prefill_body
from extproc.sim.fleet import FleetSpec, SimFleet

PROMPT = "lorem ipsum dolor sit amet " * 120


class Scripted:
    """A scripted upstream on a free port: records requests, answers with ``handler``."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def _h(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        return await self.handler(request, body)

    async def __aenter__(self) -> "Scripted":
        app = web.Application()
        app.router.add_route("*", "/{t:.*}", self._h)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def _sidecar(upstream: str, **kw: Any) -> PDSidecar:
    car = PDSidecar(HostPort("127.0.0.1", 0), parse_host_port(upstream), SidecarSettings(**kw), record_legs=True)
    await car.start()
    return car


@pytest.fixture
async def pd_fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(FleetSpec(pods=2, prefill_pods=1, time_scale=0.05)) as fl:
        yield fl


def test_prefill_body_fields() -> None:
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
            "max_completion_tokens": 50}
    p = prefill_body(body, "max_completion_tokens")
    assert p["stream"] is False and "stream_options" not in p
    assert p["max_completion_tokens"] == 1 and p["max_tokens"] == 1
    assert p["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                       "remote_block_ids": None, "remote_host": None, "remote_port": None}
    assert body["stream"] is True and "kv_transfer_params" not in body  # the original is untouched
    assert prefill_body({"input": "x"}, "max_output_tokens")["max_output_tokens"] == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_pd_legs_against_sim_pods(pd_fleet: SimFleet, stream: bool) -> None:
    prefill, decode = pd_fleet.pods
    car = await _sidecar(decode.address)
    try:
        body = {"model": "sim-llama", "prompt": PROMPT, "max_tokens": 6, "stream": stream}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{car.address}/v1/completions", json=body,
                              headers={PREFILL_HEADER: prefill.address, "x-request-id": "rid-1"}) as r:
                data = await r.read()
                assert r.status == 200
                assert r.headers["x-inference-pod"] == decode.address  # the decode pod served
                assert r.headers["x-pd-prefill-endpoint"] == prefill.address
                assert float(r.headers["x-pd-prefill-ms"]) > 0
        assert [leg[1:] for leg in car.stats.legs] == [("prefill", prefill.address), ("decode", decode.address)]
        assert {leg[0] for leg in car.stats.legs} == {"rid-1"}  # both legs carry the request id
        assert prefill.engine.stats.generation_tokens_total == 1  # prefill leg: one token
        assert decode.engine.stats.kv_transfers_total == 1  # decode leg: KV read, prompt not recomputed
        assert decode.engine.stats.kv_transfer_tokens_total > 600
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{car.address}/metrics") as r:  # passed through to the decode pod
                text = await r.text()
        assert 'vllm:nixl_xfer_time_seconds_count{engine="0",model_name="sim-llama"} 1.0' in text
        if stream:
            assert data.rstrip().endswith(b"data: [DONE]")
        else:
            assert json.loads(data)["usage"]["completion_tokens"] == 6
    finally:
        await car.stop()


async def test_no_header_passes_through_untouched(pd_fleet: SimFleet) -> None:
    _, decode = pd_fleet.pods
    car = await _sidecar(decode.address)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{car.address}/metrics") as r:
                assert r.status == 200 and "vllm:num_requests_running" in await r.text()
            async with s.post(f"http://{car.address}/v1/completions", json={"model": "sim-llama", "prompt": PROMPT, "max_tokens": 2}) as r:
                assert r.status == 200
        assert car.stats.pd == 0 and car.stats.passthrough == 2
        assert decode.engine.stats.kv_transfers_total == 0
    finally:
        await car.stop()


async def test_stream_relayed_byte_for_byte() -> None:
    chunks = [b'data: {"a":1}\n\n', b'data: {"b":"\\u00e9"}\n\ndata: {"c"', b':3}\n\n', b"data: [DONE]\n\n"]

    async def decode(request: web.Request, body: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
        await resp.write_eof()
        return resp

    async def prefill(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"choices": [], "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [1, 2]}})

    async with Scripted(decode) as d, Scripted(prefill) as p:
        car = await _sidecar(d.address)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                async with s.post(f"http://{car.address}/v1/chat/completions", headers={PREFILL_HEADER: p.address},
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                        "max_tokens": 9}) as r:
                    got = await r.read()
            assert got == b"".join(chunks)
            pbody = json.loads(p.requests[0][2])
            assert pbody["stream"] is False and pbody["max_completion_tokens"] == 1
            assert pbody["kv_transfer_params"]["do_remote_decode"] is True
            dbody = json.loads(d.requests[0][2])
            assert dbody["kv_transfer_params"] == {"do_remote_prefill": True, "remote_block_ids": [1, 2]}
            assert dbody["stream"] is True and dbody["max_tokens"] == 9
            assert PREFILL_HEADER not in {k.lower() for k in d.requests[0][1]}  # never reaches a vLLM
            assert PREFILL_HEADER not in {k.lower() for k in p.requests[0][1]}
        finally:
            await car.stop()


@pytest.mark.parametrize("mode", ["fallback", "error"])
async def test_prefill_5xx(mode: str) -> None:
    async def decode(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"ok": True, "kv": json.loads(body).get("kv_transfer_params")})

    async def prefill(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"error": {"message": "boom"}}, status=503)

    async with Scripted(decode) as d, Scripted(prefill) as p:
        car = await _sidecar(d.address, on_prefill_failure=mode, prefill_retries=1, retry_backoff_s=0.0)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://{car.address}/v1/completions", headers={PREFILL_HEADER: p.address},
                                  json={"model": "m", "prompt": "x", "max_tokens": 3}) as r:
                    data = await r.json()
                    if mode == "fallback":
                        assert r.status == 200 and r.headers["x-pd-fallback"] == "local-prefill"
                        assert data == {"ok": True, "kv": None}  # decode pod prefilled locally
                    else:
                        assert r.status == 502 and data["error"]["code"] == "prefill_failed"
                        assert not d.requests
            assert len(p.requests) == 2  # one retry on 503
        finally:
            await car.stop()


async def test_prefill_4xx_returned_as_is_and_unreachable_falls_back() -> None:
    async def decode(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"ok": True})

    async def prefill(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"error": {"message": "context too long", "type": "BadRequestError"}}, status=400)

    async with Scripted(decode) as d, Scripted(prefill) as p:
        car = await _sidecar(d.address)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://{car.address}/v1/completions", headers={PREFILL_HEADER: p.address},
                                  json={"model": "m", "prompt": "x"}) as r:
                    assert r.status == 400 and (await r.json())["error"]["message"] == "context too long"
                assert not d.requests
                async with s.post(f"http://{car.address}/v1/completions", headers={PREFILL_HEADER: "127.0.0.1:1"},
                                  json={"model": "m", "prompt": "x"}) as r:
                    assert r.status == 200 and r.headers["x-pd-fallback"] == "local-prefill"
        finally:
            await car.stop()


async def test_bad_header_bad_json_and_allowlist() -> None:
    async def ok(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"ok": True})

    async with Scripted(ok) as d:
        car = await _sidecar(d.address, allow=("10.0.0.0/8",))
        try:
            async with aiohttp.ClientSession() as s:
                url = f"http://{car.address}/v1/completions"
                async with s.post(url, headers={PREFILL_HEADER: "no-port"}, json={"prompt": "x"}) as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_prefill_header"
                async with s.post(url, headers={PREFILL_HEADER: "127.0.0.1:9"}, json={"prompt": "x"}) as r:
                    assert r.status == 403 and (await r.json())["error"]["code"] == "prefill_not_allowed"
                async with s.post(url, headers={PREFILL_HEADER: "10.1.2.3:8000", "content-type": "application/json"}, data=b"{nope") as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
            assert not d.requests
        finally:
            await car.stop()
