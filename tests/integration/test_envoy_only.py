"""Real Envoy in front of tiny aiohttp upstreams: Envoy-only balancing, and the extproc chain
with the scheduler down (fail-close / fail-open / spoofed destination header), plus a minimal
in-test ext_proc responder to check route A (pick honoured, served header, response observation)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from multidict import CIMultiDict
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.contract import OBSERVE_HEADER
from extproc.envoy_config import DESTINATION_HEADER, SERVED_HEADER, render_bootstrap
from extproc.envoy_runner import EnvoyProcess, EnvoyStartError
from extproc.netutil import free_port

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(60)]

PORT_HEADER = "x-upstream-port"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(slots=True)
class Upstream:
    port: int
    runner: web.AppRunner
    hits: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    hang: asyncio.Event | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _start_upstream(hang: bool = False) -> Upstream:
    state: dict[str, Upstream] = {}

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def handle(request: web.Request) -> web.StreamResponse:
        up = state["u"]
        up.hits += 1
        up.headers_seen.append(dict(request.headers))
        await request.read()
        if up.hang is not None:
            await up.hang.wait()
        if request.path == "/stream":
            resp = web.StreamResponse(headers={PORT_HEADER: str(up.port), "content-type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {i}\n\n".encode())
            await resp.write_eof()
            return resp
        return web.json_response({"port": up.port}, headers={PORT_HEADER: str(up.port)})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    up = Upstream(port=port, runner=runner, hang=asyncio.Event() if hang else None)
    state["u"] = up
    return up


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(hang: bool = False) -> Upstream:
        up = await _start_upstream(hang)
        started.append(up)
        return up

    yield make
    for up in started:
        if up.hang is not None:
            up.hang.set()
        await up.runner.cleanup()


@pytest.fixture
async def envoy() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[EnvoyProcess]]]:
    started: list[EnvoyProcess] = []

    async def make(bootstrap: dict[str, Any]) -> EnvoyProcess:
        proc = await EnvoyProcess.start(bootstrap)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        await proc.stop()
    for proc in started:
        assert proc.returncode is not None


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def _post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.post(url, json=CHAT, headers=headers or {}) as resp:
        body = await resp.read()
        return resp.status, CIMultiDict(resp.headers), body


# ---------------------------------------------------------------- Envoy-only balancing


async def test_round_robin_spreads_evenly(upstreams, envoy, http) -> None:
    ups = [await upstreams() for _ in range(3)]
    proc = await envoy(
        render_bootstrap(listen="127.0.0.1:0", endpoints=[u.addr for u in ups], lb_policy="ROUND_ROBIN")
    )
    seen: dict[int, int] = {}
    for _ in range(30):
        status, headers, _ = await _post(http, f"{proc.listener_url}/v1/chat/completions")
        assert status == 200
        port = int(headers[PORT_HEADER])
        seen[port] = seen.get(port, 0) + 1
    assert set(seen) == {u.port for u in ups}
    assert max(seen.values()) - min(seen.values()) <= 1
    assert [u.hits for u in ups] == [seen[u.port] for u in ups]


async def test_least_request_spreads(upstreams, envoy, http) -> None:
    ups = [await upstreams() for _ in range(3)]
    proc = await envoy(
        render_bootstrap(listen="127.0.0.1:0", endpoints=[u.addr for u in ups], lb_policy="LEAST_REQUEST")
    )
    for _ in range(30):
        status, headers, _ = await _post(http, f"{proc.listener_url}/v1/chat/completions")
        assert status == 200
        assert int(headers[PORT_HEADER]) in {u.port for u in ups}
    assert all(u.hits > 0 for u in ups)
    assert sum(u.hits for u in ups) == 30


async def test_least_request_full_scan_avoids_busy_upstream(upstreams, envoy, http) -> None:
    busy = await upstreams(hang=True)
    free = [await upstreams(), await upstreams()]
    proc = await envoy(
        render_bootstrap(
            listen="127.0.0.1:0",
            endpoints=[busy.addr] + [u.addr for u in free],
            lb_policy="LEAST_REQUEST_FULL_SCAN",
        )
    )
    pending: list[asyncio.Task[tuple[int, CIMultiDict[str], bytes]]] = []
    for _ in range(20):
        before = busy.hits
        task = asyncio.create_task(_post(http, f"{proc.listener_url}/v1/chat/completions"))
        # The request either finishes (a free upstream) or lands on the busy one and hangs there.
        while not task.done() and busy.hits == before:
            await asyncio.sleep(0.005)
        if task.done():
            status, headers, _ = task.result()
            assert status == 200
            assert int(headers[PORT_HEADER]) in {u.port for u in free}
        else:
            pending.append(task)
    # With one request outstanding on the busy host and none elsewhere, a full scan never picks
    # it again: it gets at most the one request that made it busy.
    assert busy.hits <= 1
    assert all(u.hits > 0 for u in free)
    assert sum(u.hits for u in free) + busy.hits == 20
    assert busy.hang is not None
    busy.hang.set()
    for task in pending:
        status, headers, _ = await task
        assert status == 200 and int(headers[PORT_HEADER]) == busy.port


# ---------------------------------------------------------------- scheduler down


def _extproc_bootstrap(scheduler_port: int, **kwargs: Any) -> dict[str, Any]:
    return render_bootstrap(
        listen="127.0.0.1:0", extproc=f"127.0.0.1:{scheduler_port}", fallback_health_path="/health", **kwargs
    )


async def test_fail_close_without_scheduler_is_5xx(upstreams, envoy, http) -> None:
    fallback = await upstreams()
    proc = await envoy(_extproc_bootstrap(free_port(), failure_mode="fail-close", fallback_endpoints=[fallback.addr]))
    status, _, _ = await _post(http, f"{proc.listener_url}/v1/chat/completions")
    assert 500 <= status < 600
    assert fallback.hits == 0


async def test_fail_open_without_scheduler_reaches_fallback(upstreams, envoy, http) -> None:
    fallbacks = [await upstreams(), await upstreams()]
    proc = await envoy(
        _extproc_bootstrap(free_port(), failure_mode="fail-open", fallback_endpoints=[u.addr for u in fallbacks])
    )
    ports = set()
    for _ in range(4):
        status, headers, body = await _post(http, f"{proc.listener_url}/v1/chat/completions")
        assert status == 200, body
        ports.add(int(headers[PORT_HEADER]))
        assert SERVED_HEADER not in {k.lower() for k in headers}
    assert ports == {u.port for u in fallbacks}


async def test_fail_open_spoofed_destination_never_decides(upstreams, envoy, http) -> None:
    fallback = await upstreams()
    spoofed = await upstreams()
    proc = await envoy(_extproc_bootstrap(free_port(), failure_mode="fail-open", fallback_endpoints=[fallback.addr]))
    for _ in range(3):
        status, headers, _ = await _post(
            http,
            f"{proc.listener_url}/v1/chat/completions",
            headers={DESTINATION_HEADER: spoofed.addr, f"{DESTINATION_HEADER}-subset": spoofed.addr},
        )
        assert status == 200
        assert int(headers[PORT_HEADER]) == fallback.port
    assert spoofed.hits == 0
    assert fallback.hits == 3
    # The spoofed headers were stripped before reaching the upstream.
    assert all(DESTINATION_HEADER not in {k.lower() for k in h} for h in fallback.headers_seen)


async def test_fail_open_without_fallback_is_json_503(upstreams, envoy, http) -> None:
    spoofed = await upstreams()
    proc = await envoy(_extproc_bootstrap(free_port(), failure_mode="fail-open"))
    status, headers, body = await _post(
        http, f"{proc.listener_url}/v1/chat/completions", headers={DESTINATION_HEADER: spoofed.addr}
    )
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "no_destination"
    assert spoofed.hits == 0


# ---------------------------------------------------------------- with a minimal ext_proc responder


@dataclass(slots=True)
class Responder:
    """Answers every ext_proc stream: sets the destination header on the request body; records
    what each stream saw (message kinds and request headers)."""

    target: str
    observe: bool = True  # also set x-extproc-observe: Envoy routes the request through the observation filter
    streams: list[list[str]] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    # fail the request-body messages whose index (0, 1, ...) this returns True for, after answering their headers:
    # a replica that dies mid-decision
    abort_body: Callable[[int], bool] | None = None
    bodies: int = 0
    aborted: int = 0


class _Servicer(ep_grpc.ExternalProcessorServicer):
    def __init__(self, responder: Responder) -> None:
        self.r = responder

    async def Process(self, request_iterator: Any, context: Any) -> AsyncIterator[ep.ProcessingResponse]:  # noqa: N802
        kinds: list[str] = []
        self.r.streams.append(kinds)
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            kinds.append(kind)
            if kind == "request_headers":
                self.r.request_headers.append(
                    {h.key: (h.raw_value.decode() or h.value) for h in req.request_headers.headers.headers}
                )
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            elif kind == "request_body":
                i, self.r.bodies = self.r.bodies, self.r.bodies + 1
                if self.r.abort_body is not None and self.r.abort_body(i):
                    self.r.aborted += 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone mid-decision")
                headers = [(DESTINATION_HEADER, self.r.target), ("x-extproc-request-id", "req-1")]
                if self.r.observe:
                    headers.append((OBSERVE_HEADER, "1"))
                mutation = ep.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
                        for k, v in headers
                    ]
                )
                yield ep.ProcessingResponse(
                    request_body=ep.BodyResponse(response=ep.CommonResponse(header_mutation=mutation))
                )
            elif kind == "response_headers":
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind == "response_body":
                yield ep.ProcessingResponse(response_body=ep.BodyResponse())
            elif kind == "response_trailers":
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


@pytest.fixture
async def responder() -> AsyncIterator[Callable[..., Awaitable[tuple[Responder, int]]]]:
    servers: list[grpc.aio.Server] = []

    async def make(target: str, observe: bool = True, abort_body: Callable[[int], bool] | None = None) -> tuple[Responder, int]:
        r = Responder(target=target, observe=observe, abort_body=abort_body)
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(_Servicer(r), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return r, port

    yield make
    for server in servers:
        await server.stop(grace=None)


async def _wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.01)


async def test_pick_is_honoured_and_observed(upstreams, envoy, http, responder) -> None:
    picked, other, fallback = await upstreams(), await upstreams(), await upstreams()
    r, port = await responder(picked.addr)
    proc = await envoy(_extproc_bootstrap(port, failure_mode="fail-open", fallback_endpoints=[fallback.addr]))
    for _ in range(3):
        async with http.post(
            f"{proc.listener_url}/stream", json=CHAT, headers={DESTINATION_HEADER: other.addr}
        ) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert int(resp.headers[PORT_HEADER]) == picked.port
            assert resp.headers[SERVED_HEADER] == picked.addr
            assert body.count(b"data:") == 3
    assert other.hits == 0 and fallback.hits == 0 and picked.hits == 3
    # The main filter never saw the client's spoofed header; the observer saw the scheduler's pick.
    await _wait_for(lambda: sum(1 for s in r.streams if "response_body" in s) >= 3)
    main = [h for h in r.request_headers if "x-extproc-request-id" not in h]
    observed = [h for h in r.request_headers if "x-extproc-request-id" in h]
    assert len(main) == 3 and len(observed) == 3
    assert all(DESTINATION_HEADER not in h for h in main)
    assert all(h[DESTINATION_HEADER] == picked.addr for h in observed)
    observe_streams = [s for s in r.streams if "request_body" not in s]
    assert all("response_body" in s and "request_body" not in s for s in observe_streams)


async def test_unsampled_pick_skips_the_observation_filter(upstreams, envoy, http, responder) -> None:
    """Without x-extproc-observe in the scheduler's answer the request takes the plain destination route, whose
    per-route config disables the observation filter: only the main stream reaches the scheduler."""
    picked = await upstreams()
    r, port = await responder(picked.addr, observe=False)
    proc = await envoy(_extproc_bootstrap(port, failure_mode="fail-close"))
    for _ in range(3):
        async with http.post(f"{proc.listener_url}/stream", json=CHAT) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert body.count(b"data:") == 3
    assert picked.hits == 3
    await asyncio.sleep(0.3)
    assert len(r.streams) == 3
    assert all("request_body" in s for s in r.streams)
    assert all("x-extproc-request-id" not in h for h in r.request_headers)


# ---------------------------------------------------------------- decision retry (docs/active-active.md)


async def test_decision_retry_decides_again_when_the_first_decision_fails(upstreams, envoy, http, responder) -> None:
    """fail-close with the decision retry: the scheduler answers the headers and then fails the body (a replica
    killed mid-decision); the internal listener decides again and the request is served by that pick. Without
    the retry the same failure is a 5xx."""
    picked, spoofed = await upstreams(), await upstreams()
    r, port = await responder(picked.addr, abort_body=lambda i: i % 2 == 0)  # every first decision fails
    proc = await envoy(_extproc_bootstrap(port, failure_mode="fail-close", decision_retry=True))
    for _ in range(2):
        async with http.post(f"{proc.listener_url}/stream", json=CHAT, headers={DESTINATION_HEADER: spoofed.addr}) as resp:
            body = await resp.read()
            assert resp.status == 200, body
            assert resp.headers[SERVED_HEADER] == picked.addr
            assert body.count(b"data:") == 3
    assert r.aborted == 2 and picked.hits == 2 and spoofed.hits == 0
    main = [s for s in r.streams if "request_body" in s]
    assert len(main) == 4  # each request: the failed first decision, then the retry's
    # the retry's chain saw neither the client's spoofed header nor a destination from the first pass
    assert all(DESTINATION_HEADER not in h for h in r.request_headers if "x-extproc-request-id" not in h)
    assert picked.headers_seen[-1][DESTINATION_HEADER] == picked.addr

    r2, port2 = await responder(picked.addr, abort_body=lambda i: i == 0)
    proc2 = await envoy(_extproc_bootstrap(port2, failure_mode="fail-close", decision_retry=False))
    status, headers, body = await _post(http, f"{proc2.listener_url}/v1/chat/completions")
    assert status == 500 and headers["content-type"] == "application/json", body
    assert json.loads(body)["error"]["type"] == "internal_error"
    assert picked.hits == 2


@pytest.mark.parametrize("mode", ["fail-close", "fail-open"])
async def test_decision_retry_keeps_the_failure_mode_when_every_decision_fails(upstreams, envoy, http, responder, mode: str) -> None:
    """Both passes fail: fail-close answers a JSON 500 and routes nothing; fail-open goes to the fallback (no
    pick). The first pass failing open never routes a request by itself."""
    picked, fallback, spoofed = await upstreams(), await upstreams(), await upstreams()
    r, port = await responder(picked.addr, abort_body=lambda i: True)
    proc = await envoy(_extproc_bootstrap(port, failure_mode=mode, decision_retry=True, fallback_endpoints=[fallback.addr]))
    status, headers, body = await _post(http, f"{proc.listener_url}/v1/chat/completions", headers={DESTINATION_HEADER: spoofed.addr})
    assert r.aborted == 2  # the first pass and the retry
    assert picked.hits == 0 and spoofed.hits == 0
    if mode == "fail-close":
        assert status == 500 and headers["content-type"] == "application/json", body
        assert fallback.hits == 0
    else:
        assert status == 200 and int(headers[PORT_HEADER]) == fallback.port
        assert SERVED_HEADER not in {k.lower() for k in headers}


# ---------------------------------------------------------------- the runner itself


async def test_runner_reports_startup_failure_and_reaps(tmp_path) -> None:
    bad = render_bootstrap(listen="127.0.0.1:0", endpoints="127.0.0.1:1")
    bad["static_resources"]["clusters"][0]["no_such_field"] = True
    with pytest.raises(EnvoyStartError) as info:
        await EnvoyProcess.start(bad, workdir=tmp_path)
    assert "no_such_field" in str(info.value)
    assert (tmp_path / "envoy.log").exists()


async def test_runner_context_manager_and_stats(upstreams, http) -> None:
    up = await upstreams()
    async with await EnvoyProcess.start(render_bootstrap(listen="127.0.0.1:0", endpoints=[up.addr])) as proc:
        assert proc.listener_port > 0 and proc.admin_url.startswith("http://127.0.0.1:")
        status, _, _ = await _post(http, f"{proc.listener_url}/v1/completions")
        assert status == 200
        stats = await proc.stats("cluster.backends.upstream_rq_total")
        assert stats["cluster.backends.upstream_rq_total"] == 1
        workdir = proc.log_path.parent
    assert proc.returncode is not None
    assert not workdir.exists()
    assert await proc.stop() == proc.returncode  # idempotent
