"""The routing path end to end: client → real Envoy → ext_proc (extproc serve, real gRPC) → simulated vLLM pod."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from extproc.harness import Stack, StackSpec

pytestmark = pytest.mark.envoy
MODEL = "sim-llama"


async def post(session, url, path, body, headers=None):
    async with session.post(url + path, json=body, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.fixture
async def stack(fleet):
    async with Stack(StackSpec(endpoints=fleet.endpoints, config="default", models=[MODEL])) as st:
        yield st


async def test_every_request_served_by_picked_pod(stack):
    bodies = []
    for i in range(24):
        stream = i % 2 == 0
        if i % 3 == 0:
            b = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4, "stream": stream}
            path = "/v1/chat/completions"
        else:
            b = {"model": MODEL, "prompt": f"shared system prompt {i % 4} " * 20 + str(i), "max_tokens": 4, "stream": stream}
            path = "/v1/completions"
        bodies.append((path, b))
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(post(s, stack.url, p, b) for p, b in bodies))
    served = set()
    for status, headers, data in results:
        assert status == 200, data
        picked = headers["x-gateway-destination-endpoint-served"]
        assert picked == headers["x-inference-pod"]
        served.add(picked)
    assert len(served) >= 2  # load is spread, not piled on one pod


async def test_spoofed_destination_never_reaches_upstream(fleet):
    trap_hits = []

    async def trap(request):
        trap_hits.append(request.path)
        return web.Response(text="trapped")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", trap)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    trap_addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    spoof = {"x-gateway-destination-endpoint": trap_addr, "x-gateway-destination-endpoint-subset": trap_addr}
    try:
        for mode in ("fail-close", "fail-open"):
            async with Stack(StackSpec(endpoints=fleet.endpoints, failure_mode=mode, models=[MODEL])) as st, aiohttp.ClientSession() as s:
                status, headers, _ = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, spoof)
                assert status == 200 and headers["x-inference-pod"] in fleet.endpoints
                async with s.get(st.url + "/v1/models", headers=spoof) as r:  # no body
                    assert r.status == 200
                async with s.post(st.url + "/v1/completions", headers=spoof) as r:  # body-less POST
                    assert r.status == 400
                async with s.get(st.url + "/anything", headers=spoof) as r:
                    assert r.status == 404
                if mode == "fail-open":
                    await st.stop_scheduler(hard=True)
                    status, headers, _ = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, spoof)
                    assert status == 200 and headers["x-inference-pod"] in fleet.endpoints
    finally:
        await runner.cleanup()
    assert trap_hits == []


@pytest.mark.parametrize(
    "path,raw,headers,status,code",
    [
        ("/v1/completions", b"{not json", {}, 400, "invalid_json"),
        ("/v1/completions", json.dumps({"prompt": "x"}).encode(), {}, 400, "missing_field"),
        ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), {}, 400, "missing_field"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": 5}).encode(), {}, 400, "invalid_type"),
        ("/v1/completions", json.dumps({"model": "unknown-model", "prompt": "x"}).encode(), {}, 404, "model_not_found"),
        ("/v1/completions", b"", {}, 400, "empty_body"),
    ],
)
async def test_bad_input_gets_status_and_json(stack, path, raw, headers, status, code):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.url + path, data=raw, headers={"content-type": "application/json", **headers}) as r:
            assert r.status == status
            err = json.loads(await r.read())["error"]
            assert err["code"] == code and err["message"] and err["type"]
        # the next valid request still routes
        status2, _, _ = await post(s, stack.url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
        assert status2 == 200


async def test_oversize_body_is_413(fleet):
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], max_body_bytes=64 * 1024)) as st, aiohttp.ClientSession() as s:
        status, _, data = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": "x" * 100_000})
        assert status == 413
        assert json.loads(data)["error"]["code"] == "request_too_large"


async def test_list_models_union(stack):
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/v1/models") as r:
        assert r.status == 200
        assert [m["id"] for m in (await r.json())["data"]] == [MODEL]


async def test_no_healthy_pod_is_503(fleet):
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], scheduler_args=["--unhealthy-after", "1"], scrape_interval_s=0.02)) as st:
        for pod in fleet.pods:
            await pod.kill()
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as s:
            status, _, data = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 503
        assert json.loads(data)["error"]["code"] in ("no_candidate", "no_endpoints")


async def test_fail_close_when_scheduler_down(fleet):
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], failure_mode="fail-close")) as st:
        await st.stop_scheduler(hard=True)
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status >= 500


async def test_inflight_returns_to_zero(fleet):
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True)) as st:
        async with aiohttp.ClientSession() as s:
            reqs = [post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": f"p{i}", "max_tokens": 3, "stream": i % 2 == 0}) for i in range(12)]
            assert all(r[0] == 200 for r in await asyncio.gather(*reqs))
        for _ in range(100):
            if all(ep.inflight == 0 for ep in st.server.pool.snapshot()):
                break
            await asyncio.sleep(0.02)
        assert [ep.inflight for ep in st.server.pool.snapshot()] == [0, 0, 0]
        assert len(st.server.tracker) == 0
