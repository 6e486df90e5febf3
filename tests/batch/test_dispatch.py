"""The dispatcher against a scripted HTTP server: headers, AIMD back-off, retries, final failures, deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.batch.dispatch import DispatchConfig, Dispatcher


class Scripted:
    def __init__(self) -> None:
        self.script: list[int] = []
        self.seen: list[dict[str, str]] = []
        self.delay = 0.0
        self.codes: list[str] = []
        self.cur = 0
        self.peak = 0
        self.headroom: list[str] = []  # x-gateway-batch-headroom values of the next successful answers

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        self.cur += 1
        self.peak = max(self.peak, self.cur)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.cur -= 1
        status = self.script.pop(0) if self.script else 200
        body = {"ok": True} if status == 200 else {"error": {"message": "no", "type": "x", "code": self.codes.pop(0) if self.codes else ("saturated" if status == 429 else None)}}
        headers = {"x-gateway-batch-headroom": self.headroom.pop(0)} if status == 200 and self.headroom else None
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Scripted, str]]:
    s = Scripted()
    app = web.Application()
    app.router.add_post("/v1/completions", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _cfg(url: str, **kw: Any) -> DispatchConfig:
    return DispatchConfig(gateway=url, backoff_s=0.001, backoff_cap_s=0.01, decrease_cooldown_s=0.0, initial_concurrency=8, min_concurrency=1, **kw)


async def test_headers_and_backoff_on_429_then_success(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.script = [429, 429, 503, 200]
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url), sess, seed=1)
        deadline = time.time() + 100
        out = await d.send("/v1/completions", {"model": "m", "prompt": "x"}, request_id="b-1", deadline=deadline, fairness_id="tenant-a")
    assert out.ok and out.status == 200 and out.retries == 3 and out.body == {"ok": True}
    h = s.seen[0]
    assert h["x-gateway-inference-objective"] == "batch"
    assert h["x-gateway-inference-fairness-id"] == "tenant-a"
    assert h["x-request-id"] == "b-1"
    assert 95_000 <= int(h["x-slo-ttft-ms"]) <= 100_000  # the time left to the deadline
    # two saturated sheds hold the limit at what was in flight (nothing: the floor), the 503 halves it
    assert d.aimd.limit == 1 and d.aimd.holds == 2 and d.aimd.decreases == 1


async def test_other_429_is_a_hard_backoff(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.script = [429, 200]
    s.codes = ["queue_full"]
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url), sess)
        out = await d.send("/v1/completions", {"model": "m"}, request_id="r", deadline=time.time() + 10)
    assert out.ok and d.aimd.decreases == 1 and d.aimd.holds == 0 and d.aimd.limit == 4


async def test_client_error_is_final_without_retry(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.script = [404]
    async with aiohttp.ClientSession() as sess:
        out = await Dispatcher(_cfg(url), sess).send("/v1/completions", {"model": "m"}, request_id="r", deadline=time.time() + 10)
    assert not out.ok and out.status == 404 and out.error_code == "request_failed" and len(s.seen) == 1


async def test_server_errors_retry_then_fail(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.script = [500] * 10
    async with aiohttp.ClientSession() as sess:
        out = await Dispatcher(_cfg(url, max_retries=2), sess).send("/v1/completions", {"model": "m"}, request_id="r", deadline=time.time() + 10)
    assert not out.ok and out.status == 500 and out.error_code == "server_error" and len(s.seen) == 3


async def test_deadline_stops_retrying_429(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.script = [429] * 10_000
    async with aiohttp.ClientSession() as sess:
        t0 = time.monotonic()
        out = await Dispatcher(_cfg(url), sess).send("/v1/completions", {"model": "m"}, request_id="r", deadline=time.time() + 0.3)
    assert not out.ok and out.error_code == "batch_expired" and time.monotonic() - t0 < 2


async def test_unreachable_gateway_fails_after_retries() -> None:
    from extproc.netutil import free_port

    async with aiohttp.ClientSession() as sess:
        out = await Dispatcher(_cfg(f"http://127.0.0.1:{free_port()}", max_retries=1), sess).send("/v1/completions", {"model": "m"}, request_id="r", deadline=time.time() + 10)
    assert not out.ok and out.status == 0 and out.error_code == "gateway_unreachable"


async def test_concurrency_limit_bounds_requests_on_the_wire(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.delay = 0.02
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(DispatchConfig(gateway=url, initial_concurrency=3, min_concurrency=3, max_concurrency=3), sess)
        outs = await asyncio.gather(*(d.send("/v1/completions", {"model": "m"}, request_id=str(i), deadline=time.time() + 10) for i in range(12)))
    assert all(o.ok for o in outs)
    assert s.peak == 3 and d.aimd.inflight == 0


async def test_cancelled_sends_give_their_slots_back(server: tuple[Scripted, str]) -> None:
    # regression: an awaiting release could be interrupted by the cancel of a dropped job and leak its slot
    s, url = server
    s.delay = 0.05
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(DispatchConfig(gateway=url, initial_concurrency=10, min_concurrency=2, max_concurrency=10), sess)
        for _ in range(3):
            ts = [asyncio.create_task(d.send("/v1/completions", {"model": "m"}, request_id=str(i), deadline=time.time() + 10)) for i in range(40)]
            await asyncio.sleep(0.08)
            for t in ts:
                t.cancel()
            await asyncio.gather(*ts, return_exceptions=True)
            assert d.aimd.inflight == 0


async def test_gateway_headroom_sets_the_limit(server: tuple[Scripted, str]) -> None:
    s, url = server
    s.headroom = ["7", "abc", "0"]
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url), sess)
        await d.send("/v1/completions", {"model": "m"}, request_id="a", deadline=time.time() + 10)
        assert d.aimd.limit == 1 + 7 and d.aimd.headroom_updates == 1  # sent alone, 7 more slots free
        await d.send("/v1/completions", {"model": "m"}, request_id="b", deadline=time.time() + 10)
        assert d.aimd.limit == 8 and d.aimd.headroom_updates == 1  # a malformed value is ignored
        await d.send("/v1/completions", {"model": "m"}, request_id="c", deadline=time.time() + 10)
        assert d.aimd.limit == 1 and d.aimd.headroom_updates == 2  # it took the last slot: the level is 1
    s.headroom = ["7"]
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url, use_headroom=False), sess)
        await d.send("/v1/completions", {"model": "m"}, request_id="d", deadline=time.time() + 10)
        assert d.aimd.headroom_updates == 0 and d.aimd.limit == 8


async def test_guided_slots_avoid_the_completion_race_and_shed_churn(server: tuple[Scripted, str]) -> None:
    s, url = server
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url, race_window_s=0.3), sess)
        s.headroom = ["0"]  # admitted as the last free batch slot: the fleet's batch band is full
        await d.send("/v1/completions", {"model": "m"}, request_id="a", deadline=time.time() + 10)
        assert d.aimd.guided() and d.aimd.inflight == 1  # its slot comes back after the race window, not at once
        await asyncio.sleep(0.6)
        assert d.aimd.inflight == 0
        # a saturated shed right after a completion (the race): the line keeps its slot while it waits to retry
        shed = b'{"error": {"code": "saturated"}}'
        await d.aimd.acquire()
        d.aimd.on_success()
        assert d._release_slot(429, -1, shed) is True and d.aimd.inflight == 1
        d.aimd.release()
        # a shed outside the race window: a real one, the slot goes back and the limit is held below it
        d.aimd._last_ok = -1e18
        await d.aimd.acquire()
        assert d._release_slot(429, -1, shed) is False and d.aimd.inflight == 0
        d.aimd.on_saturated()
        assert d.aimd.limit == 1 and d.aimd.holds == 1
        # a stale headroom answer right after that shed may not raise the limit again, only lower it
        d.aimd.on_headroom(sent_inflight=4, free=6)
        assert d.aimd.limit == 1
        d.aimd._last_shed = -1e18
        d.aimd.on_headroom(sent_inflight=4, free=6)
        assert d.aimd.limit == 10
    s.script, s.headroom = [429, 200], []
    async with aiohttp.ClientSession() as sess:
        d = Dispatcher(_cfg(url, use_headroom=False), sess)  # AIMD alone: a shed line gives its slot back at once
        d.cfg.backoff_s = d.cfg.backoff_cap_s = 0.4
        t = asyncio.create_task(d.send("/v1/completions", {"model": "m"}, request_id="c", deadline=time.time() + 10))
        deadline = time.monotonic() + 5
        while len(s.seen) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert d.aimd.inflight == 0
        assert (await asyncio.wait_for(t, 5)).ok
