"""Shared helpers for the reliability tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.sim.fleet import FleetSpec, SimFleet

MODEL = "sim-llama"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(FleetSpec(pods=3, profile="llama3-8b-h100", model=MODEL, time_scale=0.05, seed=1)) as f:
        yield f


async def post(
    session: aiohttp.ClientSession, url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON body (or raw bytes) and read the whole answer; a transport error becomes status 0."""
    kw: dict[str, Any] = {"data": body, "headers": {"content-type": "application/json", **(headers or {})}} if isinstance(body, bytes) else {"json": body, "headers": headers or {}}
    try:
        async with session.post(url + path, **kw) as r:
            return r.status, dict(r.headers), await r.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        return 0, {}, repr(e).encode()


def error_of(data: bytes) -> dict[str, Any]:
    """The OpenAI-style error object of a JSON error body (asserts its shape)."""
    err = json.loads(data)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    return err


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, step_s: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout_s`` passes; returns the last value (generous bounds only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(step_s)


class Trap:
    """An HTTP server that records every request it receives (it must receive none)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "Trap":
        async def trap(request: web.Request) -> web.Response:
            self.hits.append(f"{request.method} {request.path}")
            return web.Response(text="trapped")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", trap)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
