"""P/D through real Envoy: extproc (config ``pd``) picks the decode pod as destination and sets
x-prefiller-host-port; the decode pod's pd-sidecar runs the prefill leg, then the decode leg; the decode pod
serves. A client-supplied x-prefiller-host-port never reaches a pod."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from extproc.harness import Stack, StackSpec
from extproc.netutil import HostPort, parse_host_port
from extproc.sidecar.pd import PDSidecar
from extproc.sim.fleet import FleetSpec, SimFleet

pytestmark = pytest.mark.envoy
MODEL = "sim-llama"
LONG = "Explain the design document section by section. " * 60  # ~700 tokens: above nonCachedTokens 256


async def _until_ready(url: str, timeout_s: float = 20.0) -> None:
    """The scheduler serves once it has scraped the pods; wait for the first 200 (short prompt: not split)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ready?", "max_tokens": 1}) as r:
                if r.status == 200:
                    return
                if loop.time() > deadline:
                    raise AssertionError(f"stack not ready: {r.status} {await r.text()}")
            await asyncio.sleep(0.2)


@pytest.fixture
async def pd_stack():  # type: ignore[no-untyped-def]
    async with SimFleet(FleetSpec(pods=4, prefill_pods=2, model=MODEL, time_scale=0.05, seed=3)) as fleet:
        prefill = [p for p in fleet.pods if p.role == "prefill"]
        decode = [p for p in fleet.pods if p.role == "decode"]
        cars = [PDSidecar(HostPort("127.0.0.1", 0), parse_host_port(p.address), record_legs=True) for p in decode]
        for c in cars:
            await c.start()
        labels = {p.address: fleet.labels[p.address] for p in prefill}
        labels.update({c.address: {"llm-d.ai/role": "decode"} for c in cars})
        spec = StackSpec(endpoints=[p.address for p in prefill] + [c.address for c in cars], config="pd", labels=labels, models=[MODEL])
        try:
            async with Stack(spec) as st:
                await _until_ready(st.url)
                for c in cars:
                    c.stats.legs.clear()
                yield st, fleet, prefill, decode, cars
        finally:
            for c in cars:
                await c.stop()


async def test_pd_request_path_through_envoy(pd_stack) -> None:  # type: ignore[no-untyped-def]
    st, fleet, prefill, decode, cars = pd_stack
    by_car = {c.address: c for c in cars}
    upstream_of = {c.address: str(c.upstream) for c in cars}
    prefill_addrs = {p.address for p in prefill}
    async with aiohttp.ClientSession() as s:
        for i, stream in enumerate((False, True, True, False)):
            body = {"model": MODEL, "prompt": f"[doc {i}] " + LONG, "max_tokens": 5, "stream": stream}
            async with s.post(st.url + "/v1/completions", json=body) as r:
                data = await r.read()
                assert r.status == 200, data
                picked = r.headers["x-gateway-destination-endpoint-served"]
                assert picked in by_car  # the decode pod (its sidecar) is the destination
                assert r.headers["x-inference-pod"] == upstream_of[picked]  # ... and the decode pod served
                assert r.headers["x-pd-prefill-endpoint"] in prefill_addrs  # the prefill header was set
                legs = by_car[picked].stats.legs
                assert [leg[1] for leg in legs[-2:]] == ["prefill", "decode"]  # legs in order
                assert legs[-2][2] == r.headers["x-pd-prefill-endpoint"] and legs[-1][2] == upstream_of[picked]
                if stream:
                    assert data.rstrip().endswith(b"data: [DONE]")
    assert sum(p.engine.stats.kv_transfers_total for p in decode) == 4
    assert sum(p.engine.stats.generation_tokens_total for p in prefill) == 4  # one token per prefill leg


async def test_short_prompt_not_split_and_client_header_stripped(pd_stack) -> None:  # type: ignore[no-untyped-def]
    st, fleet, prefill, decode, cars = pd_stack
    trap_hits: list[str] = []

    async def trap(request: web.Request) -> web.Response:
        trap_hits.append(request.path)
        return web.json_response({"trapped": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", trap)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    trap_addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as s:
            for prompt in ("short question", LONG):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
                async with s.post(st.url + "/v1/completions", json=body, headers={"x-prefiller-host-port": trap_addr}) as r:
                    assert r.status == 200, await r.read()
                    if prompt == LONG:
                        assert r.headers["x-pd-prefill-endpoint"] != trap_addr
                    else:
                        assert "x-pd-prefill-endpoint" not in r.headers  # below the threshold: local prefill
        assert trap_hits == []
        assert all(c.stats.rejected == 0 for c in cars)
    finally:
        await runner.cleanup()
