"""Batch and interactive on one fleet (config ``batch-interactive``): batch is shed with 429 while the fleet is
saturated and completes when it is idle; interactive requests are never shed; every request gets an answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from reliability_lib import MODEL, error_of, post

from extproc.harness import Stack, StackSpec
from extproc.sim.fleet import FleetSpec, SimFleet

pytestmark = pytest.mark.envoy

BATCH = {"x-gateway-inference-objective": "batch"}
INTERACTIVE = {"x-gateway-inference-objective": "interactive"}
PER_POD_BATCH_LIMIT = 6  # maxInflightPerPod / inflight-limit-filter maxInflight in batch-interactive.yaml


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with SimFleet(FleetSpec(pods=2, profile="llama3-8b-h100", model=MODEL, time_scale=1.0, seed=3)) as fleet:
        async with Stack(StackSpec(endpoints=fleet.endpoints, config="batch-interactive", models=[MODEL])) as st:
            yield st


async def long_stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """A long streaming request; ``started`` is set once its response headers arrived (it is in flight on a pod)."""
    body = {"model": MODEL, "prompt": "long running work " * 8, "max_tokens": 600, "stream": True, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
        started.set()
        data = await r.read()
        return r.status, r.headers.get("x-inference-pod", ""), data


async def test_batch_shed_while_saturated_and_served_when_idle(stack: Stack) -> None:
    short = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    async with aiohttp.ClientSession() as s:
        # idle fleet: batch is served
        status, headers, data = await post(s, stack.url, "/v1/completions", short, BATCH)
        assert status == 200, data
        assert headers.get("x-inference-pod")

        # saturate: interactive work fills every pod up to the batch limit
        events = [asyncio.Event() for _ in range(2 * PER_POD_BATCH_LIMIT)]
        fill = [asyncio.create_task(long_stream(s, stack.url, ev, INTERACTIVE)) for ev in events]
        try:
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), 60)

            # batch is shed at once: an ImmediateResponse from the gateway, never routed to a pod
            shed = await asyncio.gather(*(post(s, stack.url, "/v1/completions", short, BATCH) for _ in range(5)))
            for status, headers, data in shed:
                assert status == 429, data
                assert "x-inference-pod" not in headers and "x-gateway-destination-endpoint-served" not in headers
                assert error_of(data)["code"] == "saturated"

            # interactive is never shed: it uses the headroom kept above the batch limit
            inter = await asyncio.gather(*(post(s, stack.url, "/v1/completions", short, INTERACTIVE) for _ in range(2)))
            for status, headers, data in inter:
                assert status == 200, data
                assert headers.get("x-inference-pod")
        finally:
            results = await asyncio.gather(*fill, return_exceptions=True)

        # every long request got its full answer
        for r in results:
            assert not isinstance(r, BaseException), r
            status, pod, data = r
            assert status == 200 and pod
            assert b"[DONE]" in data
        # the pods spread the fill: the filter never piles more than the limit on one pod
        pods = [r[1] for r in results if not isinstance(r, BaseException)]
        assert max(pods.count(p) for p in set(pods)) <= PER_POD_BATCH_LIMIT

        # idle again: batch completes (our in-flight accounting has drained)
        status, headers, data = await post(s, stack.url, "/v1/completions", short, BATCH)
        for _ in range(50):
            if status == 200:
                break
            assert status == 429, data
            await asyncio.sleep(0.1)
            status, headers, data = await post(s, stack.url, "/v1/completions", short, BATCH)
        assert status == 200, data
        assert json.loads(data)["choices"][0]["text"] is not None
