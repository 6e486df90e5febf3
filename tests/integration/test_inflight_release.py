"""In-flight accounting through real Envoy when requests do not end normally: a client that leaves frees its pod at
once, and a request held in flow control longer than Envoy's ext_proc message timeout is still served by its pick.

Both were found in the batch benchmark (docs/batch.md): a cancelled job's ~15 flights per pod stayed counted for
Envoy's 5 s deferred close of their observation streams, and waits past the 2 s message timeout got Envoy's 504
while the scheduler dispatched them anyway — flights nothing would ever end, until flow control held everything."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from extproc.harness import Stack, StackSpec
from extproc.sim.fleet import FleetSpec, SimFleet

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]
MODEL = "sim-llama"


async def _scheduler_state(s: aiohttp.ClientSession, metrics_url: str) -> tuple[float, dict[str, float], dict[str, float]]:
    async with s.get(metrics_url + "/metrics") as r:
        text = await r.text()
    inflight = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("extproc_pod_inflight_requests{"))
    outcomes = {m[1]: float(m[2]) for m in re.finditer(r'extproc_request_completions_total\{outcome="([^"]+)"\} (\S+)', text)}
    flow = {m[1]: float(m[2]) for m in re.finditer(r"^extproc_flow_control_(\w+) (\S+)$", text, re.M)}
    return inflight, outcomes, flow


async def test_clients_that_leave_free_their_pods_at_once() -> None:
    """Streamed and non-streamed requests cut mid-generation: the access-log entry (flushed every 10 ms) ends each
    flight as ``disconnected``, without waiting for Envoy to close its observation stream (5 s later)."""
    async with SimFleet(FleetSpec(pods=2, profile="llama3-8b-h100", model=MODEL, time_scale=1.0, seed=1)) as fleet:
        async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL])) as st, aiohttp.ClientSession() as s:
            assert st.metrics_url is not None

            async def one(i: int) -> None:
                body = {"model": MODEL, "prompt": f"request {i} " * 40, "max_tokens": 1000, "stream": i % 2 == 0}
                async with s.post(st.url + "/v1/completions", json=body) as r:
                    async for _ in r.content.iter_any():
                        pass

            tasks = [asyncio.create_task(one(i)) for i in range(12)]
            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            while (await _scheduler_state(s, st.metrics_url))[0] < 12:  # all of them routed and generating
                assert loop.time() < end
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cut = loop.time()
            while (state := await _scheduler_state(s, st.metrics_url))[0] > 0:
                assert loop.time() - cut < 2.0, state  # well inside Envoy's 5 s deferred close
                await asyncio.sleep(0.05)
            inflight, outcomes, _ = state
    assert outcomes.get("disconnected", 0) == 12, outcomes


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
  maxInflightPerPod: 1
flowControl:
  enabled: true
  queueTtlSeconds: 20
"""


@pytest.mark.parametrize("failure_mode", ["fail-close", "fail-open"])
async def test_flow_control_wait_outlasts_envoys_message_timeout(tmp_path: Path, failure_mode: str) -> None:
    """One pod, one slot: the second request waits in flow control for the first (~1.4 s) — far past Envoy's message
    timeout (0.3 s here). The scheduler extends the timer (``override_message_timeout``) before it waits, so the
    request is served by the scheduler's pick: not Envoy's 504 (fail-close), not Envoy's fallback route around flow
    control (fail-open). Afterwards nothing is left counted."""
    from extproc.contract import SERVED_HEADER

    cfg = tmp_path / "flow.yaml"
    cfg.write_text(FLOW_CONFIG)
    async with SimFleet(FleetSpec(pods=1, profile="llama3-8b-h100", model=MODEL, time_scale=1.0, seed=2)) as fleet:
        spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], config=str(cfg), failure_mode=failure_mode, envoy_args={"message_timeout_s": 0.3})
        async with Stack(spec) as st, aiohttp.ClientSession() as s:
            assert st.metrics_url is not None

            async def one(i: int, max_tokens: int) -> tuple[int, str, float, bytes]:
                t0 = asyncio.get_running_loop().time()
                body = {"model": MODEL, "prompt": f"request {i} " * 20, "max_tokens": max_tokens}
                async with s.post(st.url + "/v1/completions", json=body) as r:
                    data = await r.read()
                    return r.status, r.headers.get(SERVED_HEADER, ""), asyncio.get_running_loop().time() - t0, data

            first = asyncio.create_task(one(0, 200))
            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            while (await _scheduler_state(s, st.metrics_url))[0] < 1:
                assert loop.time() < end
                await asyncio.sleep(0.02)
            second = await one(1, 4)
            r0 = await first
            for _ in range(100):
                inflight, outcomes, flow = await _scheduler_state(s, st.metrics_url)
                if inflight == 0:
                    break
                await asyncio.sleep(0.05)
    assert r0[0] == 200, r0
    status, served, waited_s, data = second
    assert status == 200, (status, data[:300])
    assert served == fleet.endpoints[0]  # the scheduler's pick, echoed by Envoy (the fallback route sets none)
    assert waited_s > 0.6, waited_s  # it really waited well past the 0.3 s message timeout
    assert flow["enqueued_total"] == 1 and flow["released_total"] == 1 and flow["expired_total"] == 0, flow
    assert inflight == 0 and outcomes.get("ok") == 2, outcomes
