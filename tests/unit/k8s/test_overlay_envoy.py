"""The Envoy Gateway and Istio overlays, as Envoy configuration, through the real Envoy binary.

Neither controller runs here, so each overlay is translated into the Envoy config its controller produces
for it (the pieces that decide routing, taken from the manifests themselves): for Envoy Gateway the
ClientTrafficPolicy's ``earlyRequestHeaders.remove`` becomes the HCM early header mutation, the
EnvoyPatchPolicy's JSON patches are applied to a Listener / RouteConfiguration shaped like Envoy Gateway's
(``default/inference-gateway/llm-gw``) and its cluster is added verbatim, the EnvoyExtensionPolicy becomes the
ext_proc filter (failOpen → ``failure_mode_allow``); for Istio the EnvoyFilter's MERGE value is merged into the
gateway's HCM. Each config passes ``envoy --mode validate``, then runs with a "trap" upstream named in every
spoofable routing header: in fail-open and fail-close, with the scheduler down and up, the trap receives
nothing; a control run without the strip shows the trap *is* reachable, so the check can fail.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc import envoy_config as ec
from extproc.envoy_runner import EnvoyProcess
from extproc.harness import SchedulerProcess
from extproc.netutil import free_port
from extproc.sim.fleet import FleetSpec, SimFleet
from test_k8s_manifests import MANIFESTS, _json6902, _merge, build, by_kind

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(180)]

MODEL = "sim-llama"
HCM_NAME = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
EG_NAME = "default/inference-gateway/llm-gw"


def _extproc_cluster(port: int) -> dict[str, Any]:
    return {
        "name": "extproc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "extproc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _ext_proc_filter(fail_open: bool, *, timeout: str = "5s", allow_override: bool = False) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}},
            "failure_mode_allow": fail_open,
            "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "BUFFERED", "response_header_mode": "SEND", "response_body_mode": "NONE", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
            "message_timeout": timeout,
            "allow_mode_override": allow_override,
            "mutation_rules": {"allow_all_routing": True},
        },
    }


ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _bootstrap(listener: dict[str, Any], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _listener(name: str, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "default_filter_chain": {"filters": [{"name": HCM_NAME, "typed_config": hcm}]},
    }


def envoy_gateway_bootstrap(objs: list[dict[str, Any]], extproc_port: int, *, fail_open: bool, strip: bool = True) -> dict[str, Any]:
    """What Envoy Gateway renders for the overlay (the routing-relevant part)."""
    ctp = by_kind(objs, "ClientTrafficPolicy")
    epp = by_kind(objs, "EnvoyExtensionPolicy")["spec"]["extProc"][0]
    patch = by_kind(objs, "EnvoyPatchPolicy")["spec"]["jsonPatches"]
    assert epp["processingMode"]["request"]["body"] == "Buffered"
    removed = ctp["spec"]["headers"]["earlyRequestHeaders"]["remove"]
    early = [{
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            "mutations": [{"remove": h} for h in removed],
        },
    }] if strip else []  # fmt: skip
    route_config: dict[str, Any] = {
        "name": EG_NAME,
        "virtual_hosts": [{
            "name": "default/inference-gateway/llm-gw/*",
            "domains": ["*"],
            "routes": [{"name": "httproute/default/llm-route/rule/0/match/0/*", "match": {"prefix": "/"},
                        "route": {"cluster": "httproute/default/llm-route/rule/0", "timeout": "300s"}}],
        }],
    }  # fmt: skip
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "http-8081",
        "route_config": route_config,
        "http_filters": [_ext_proc_filter(fail_open, timeout=epp["messageTimeout"], allow_override=epp["processingMode"]["allowModeOverride"]), ROUTER],
        "early_header_mutation_extensions": early,
    }
    listener = _listener(EG_NAME, hcm)
    clusters = [_extproc_cluster(extproc_port)]
    for p in patch:
        op = p["operation"]
        if p["type"].endswith("cluster.v3.Cluster"):
            assert op["op"] == "add" and op["path"] == ""
            clusters.append(copy.deepcopy(op["value"]))
        elif p["type"].endswith("route.v3.RouteConfiguration"):
            assert p["name"] == EG_NAME
            _json6902(route_config, [op])
        elif p["type"].endswith("listener.v3.Listener"):
            assert p["name"] == EG_NAME
            _json6902(listener, [op])
        else:
            raise AssertionError(f"unexpected patch {p['type']}")
    return _bootstrap(listener, clusters)


def istio_bootstrap(objs: list[dict[str, Any]], extproc_port: int, *, fail_open: bool, strip: bool = True) -> dict[str, Any]:
    """An Istio gateway's HCM with the overlay's EnvoyFilter MERGE applied; the pool picked through the
    destination header (ORIGINAL_DST)."""
    ef = by_kind(objs, "EnvoyFilter")
    (cp,) = ef["spec"]["configPatches"]
    assert cp["applyTo"] == "NETWORK_FILTER" and cp["match"]["context"] == "GATEWAY" and cp["patch"]["operation"] == "MERGE"
    assert cp["match"]["listener"]["filterChain"]["filter"]["name"] == HCM_NAME
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "outbound_0.0.0.0_80",
        "route_config": {"name": "http.80", "virtual_hosts": [{"name": "*", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inference-pool", "timeout": "300s"}}]}]},
        "http_filters": [_ext_proc_filter(fail_open), ROUTER],
    }
    if strip:
        patched = _merge({"typed_config": hcm}, cp["patch"]["value"])["typed_config"]
    else:
        patched = {**hcm, "local_reply_config": cp["patch"]["value"]["typed_config"]["local_reply_config"]}
    pool = {
        "name": "inference-pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": ec.DESTINATION_HEADER},
    }
    return _bootstrap(_listener("0.0.0.0_80", patched), [_extproc_cluster(extproc_port), pool])


OVERLAYS = {"envoy-gateway": envoy_gateway_bootstrap, "istio": istio_bootstrap}


# --------------------------------------------------------------------------------------------- static checks


def test_overlays_strip_every_spoofable_header_and_carry_json_local_replies() -> None:
    eg = build(MANIFESTS / "overlays/envoy-gateway")
    removed = by_kind(eg, "ClientTrafficPolicy")["spec"]["headers"]["earlyRequestHeaders"]["remove"]
    assert removed == list(ec.SPOOFABLE_HEADERS)
    gw = by_kind(eg, "Gateway")
    assert by_kind(eg, "ClientTrafficPolicy")["spec"]["targetRefs"][0]["name"] == gw["metadata"]["name"]
    lst = next(p for p in by_kind(eg, "EnvoyPatchPolicy")["spec"]["jsonPatches"] if p["type"].endswith("Listener"))
    assert lst["operation"]["value"] == ec._to_dict(ec.local_reply_config())
    istio = build(MANIFESTS / "overlays/istio")
    value = by_kind(istio, "EnvoyFilter")["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
    assert value["early_header_mutation_extensions"] == [ec._to_dict(ec._early_header_mutation())]
    assert value["local_reply_config"] == ec._to_dict(ec.local_reply_config())
    sel = by_kind(istio, "EnvoyFilter")["spec"]["workloadSelector"]["labels"]
    assert sel == {"gateway.networking.k8s.io/gateway-name": by_kind(istio, "Gateway")["metadata"]["name"]}


def test_overlay_patches_are_current() -> None:
    """The generated pieces equal what scripts/render_overlay_patches.py writes now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_overlay_patches", MANIFESTS.parent / "scripts/render_overlay_patches.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    istio = by_kind(build(MANIFESTS / "overlays/istio"), "EnvoyFilter")
    assert {k: v for k, v in istio.items() if k != "metadata"} == {k: v for k, v in mod.istio_envoy_filter().items() if k != "metadata"}
    eg = by_kind(build(MANIFESTS / "overlays/envoy-gateway"), "EnvoyPatchPolicy")
    assert mod.eg_listener_patch() in eg["spec"]["jsonPatches"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-close", "fail-open"])
def test_overlay_envoy_config_validates(overlay: str, fail_open: bool) -> None:
    objs = build(MANIFESTS / "overlays" / overlay)
    ec.validate_bootstrap(OVERLAYS[overlay](objs, 9002, fail_open=fail_open))


# --------------------------------------------------------------------------------------------- live through Envoy


class _Trap:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def hit(request: web.Request) -> web.Response:
            self.hits.append(f"{request.method} {request.path}")
            return web.Response(text="trapped")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hit)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(FleetSpec(pods=2, profile="llama3-8b-h100", model=MODEL, time_scale=0.05, seed=1)) as f:
        yield f


@pytest.fixture
async def trap() -> AsyncIterator[_Trap]:
    t = _Trap()
    await t.start()
    yield t
    await t.stop()


async def _spoof(s: aiohttp.ClientSession, url: str, trap: str) -> list[int]:
    statuses = []
    body = json.dumps({"model": MODEL, "prompt": "spoof", "max_tokens": 2})
    for name in ec.SPOOFABLE_HEADERS:
        for method, data in (("POST", body), ("GET", None)):
            async with s.request(method, url + ("/v1/completions" if data else "/v1/models"), data=data, headers={name: trap, "content-type": "application/json"}) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


async def _scheduler(fleet: SimFleet, port: int) -> SchedulerProcess:
    return await SchedulerProcess.start(
        ["--endpoints", ",".join(fleet.endpoints), "--model", MODEL, "--grpc-port", str(port), "--health-port", "0", "--metrics-port", "0",
         "--response-observe", "none", "--scrape-interval", "0.05", "--log-level", "warning"]
    )  # fmt: skip


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-close", "fail-open"])
async def test_overlay_spoofed_headers_never_reach_trap(overlay: str, fail_open: bool, fleet: SimFleet, trap: _Trap) -> None:
    port = free_port()
    envoy = await EnvoyProcess.start(OVERLAYS[overlay](build(MANIFESTS / "overlays" / overlay), port, fail_open=fail_open))
    sched: SchedulerProcess | None = None
    try:
        async with aiohttp.ClientSession() as s:
            down = await _spoof(s, envoy.listener_url, trap.address)  # scheduler down
            assert not trap.hits, trap.hits
            assert all(c >= 500 for c in down), down
            if not fail_open:  # Envoy's own 500, in the JSON shape of the overlay's local_reply_config
                async with s.post(envoy.listener_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
                    assert r.status == 500 and (await r.json())["error"]["code"] == "gateway_error"
            sched = await _scheduler(fleet, port)
            ok = False
            for _ in range(100):  # Envoy reconnects to the scheduler
                async with s.post(envoy.listener_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
                    await r.read()
                    if r.status == 200:
                        ok = r.headers.get("x-inference-pod") in fleet.endpoints
                        break
                await asyncio.sleep(0.05)
            assert ok
            await _spoof(s, envoy.listener_url, trap.address)  # scheduler up
            assert not trap.hits, trap.hits
    finally:
        await envoy.stop()
        if sched is not None:
            await sched.stop()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
async def test_control_without_the_strip_the_trap_is_reached(overlay: str, trap: _Trap) -> None:
    """Fail-open, scheduler down, the overlay's early strip left out: the spoofed header picks the upstream."""
    boot = OVERLAYS[overlay](build(MANIFESTS / "overlays" / overlay), free_port(), fail_open=True, strip=False)
    envoy = await EnvoyProcess.start(boot)
    try:
        async with aiohttp.ClientSession() as s:
            await _spoof(s, envoy.listener_url, trap.address)
        assert trap.hits
    finally:
        await envoy.stop()
