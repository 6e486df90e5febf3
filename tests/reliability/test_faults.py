"""Fault injection through the real path: client → Envoy → ``extproc serve`` → simulated vLLM pods.

Every test injects a fault with the simulator's ``set_faults`` / ``kill`` / ``restart`` (or kills the scheduler)
and checks what clients see and that the scheduler's accounting recovers. Time bounds are generous (seconds
where the mechanism needs tens of milliseconds) so a loaded 2-core machine cannot flake them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.harness import Stack, StackSpec
from extproc.netutil import free_port
from extproc.sim.fleet import FleetSpec, SimFleet
from reliability_lib import MODEL, post, wait_until

pytestmark = pytest.mark.envoy


def _body(i: int, *, stream: bool = False, max_tokens: int = 4, prefix: str = "fault test") -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"{prefix} {i} " + "lorem ipsum " * 8, "max_tokens": max_tokens, "stream": stream}


async def _stream_post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """POST and read a streamed answer; (status, pod, bytes) with status 0 when the stream was cut."""
    try:
        async with s.post(url + "/v1/completions", json=body) as r:
            pod = r.headers.get("x-inference-pod", "")
            data = b""
            try:
                async for chunk in r.content.iter_any():
                    data += chunk
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                return 0, pod, data
            return r.status, pod, data
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        return 0, "", repr(e).encode()


def _inflight(st: Stack) -> list[int]:
    return [ep.inflight for ep in st.server.pool.snapshot()]


async def _drained(st: Stack) -> bool:
    return await wait_until(lambda: all(v == 0 for v in _inflight(st)) and len(st.server.tracker) == 0, timeout_s=15)


# --------------------------------------------------------------------------------------------- pod death
async def test_pod_dies_mid_stream_then_is_avoided(fleet: SimFleet) -> None:
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True)
    async with Stack(spec) as st, aiohttp.ClientSession() as s:
        for pod in fleet.pods:
            pod.set_faults(die_mid_stream=True)  # each pod's next streamed answer dies after a few chunks
        results = await asyncio.gather(*(_stream_post(s, st.url, _body(i, stream=True, max_tokens=40)) for i in range(9)))
        cut = [r for r in results if r[0] == 0 or b"[DONE]" not in r[2]]
        assert cut, "no stream was cut: the fault was not exercised"
        for status, _, data in results:
            # a clean error or a truncated stream: never a hang, never a fake [DONE]
            assert status in (0, 200) or status >= 500, status
            if status == 200 and b"[DONE]" not in data:
                assert data.count(b"data: ") >= 1
        assert await _drained(st), _inflight(st)

        # now kill a pod: the scheduler stops picking it once its scrapes fail (unhealthy_after × interval)
        victim = fleet.pods[0]
        await victim.kill()
        t0 = time.monotonic()
        ep = st.server.pool.get(victim.address)
        assert await wait_until(lambda: not ep.healthy, timeout_s=10)
        detect_s = time.monotonic() - t0
        statuses = []
        for i in range(20):
            status, headers, _ = await post(s, st.url, "/v1/completions", _body(100 + i))
            statuses.append(status)
            assert status == 200 and headers["x-inference-pod"] != victim.address
        assert await _drained(st)
        print(f"killed pod marked unhealthy after {detect_s * 1000:.0f} ms (scrape interval {spec.scrape_interval_s * 1000:.0f} ms)")


async def test_pod_recovers_after_restart(fleet: SimFleet) -> None:
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True)) as st, aiohttp.ClientSession() as s:
        victim = fleet.pods[1]
        ep = st.server.pool.get(victim.address)
        await victim.kill()
        assert await wait_until(lambda: not ep.healthy, timeout_s=10)
        await victim.restart()
        assert await wait_until(lambda: ep.healthy, timeout_s=10)
        served = collections.Counter()
        for i in range(60):
            status, headers, _ = await post(s, st.url, "/v1/completions", _body(i, prefix=f"recover {i}"))
            assert status == 200
            served[headers["x-inference-pod"]] += 1
            if served[victim.address] >= 3:
                break
        assert served[victim.address] >= 3, served
        assert await _drained(st)


# --------------------------------------------------------------------------------------------- hang
async def test_hung_pod_does_not_block_others(fleet: SimFleet) -> None:
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True)) as st, aiohttp.ClientSession() as s:
        hung = fleet.pods[2]
        hung.set_faults(hang=True)
        tasks = [asyncio.ensure_future(post(s, st.url, "/v1/completions", _body(i, prefix=f"hang {i}"))) for i in range(24)]
        try:
            # everything not sent to the hung pod completes while the hung pod still holds its requests
            assert await wait_until(lambda: sum(t.done() for t in tasks) >= 1, timeout_s=20)
            await asyncio.sleep(1.0)
            done = [t.result() for t in tasks if t.done()]
            assert done and all(r[0] == 200 and r[1]["x-inference-pod"] != hung.address for r in done)
            # scrapes of the healthy pods keep running (one task per pod): their metrics stay fresh
            now = time.monotonic()
            ages = {ep.address: ep.metrics_age(now) for ep in st.server.pool.snapshot()}
            for addr, age in ages.items():
                if addr != hung.address:
                    assert age < 1.5, ages
            assert ages[hung.address] > ages[fleet.pods[0].address]
            # a hung pod answers nothing, /metrics included: after unhealthy_after scrape timeouts it is filtered
            # (until then new requests may still be sent to it and wait; see docs/reliability.md)
            ep = st.server.pool.get(hung.address)
            assert await wait_until(lambda: not ep.healthy, timeout_s=30)
            for i in range(6):
                status, headers, data = await post(s, st.url, "/v1/completions", _body(1000 + i, prefix=f"during hang {i}"))
                assert status == 200 and headers["x-inference-pod"] != hung.address, (status, headers, data)
            pending = [t for t in tasks if not t.done()]
        finally:
            hung.set_faults()  # release the hang
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert all(r[0] == 200 for r in results), [r[0] for r in results]
        if pending:  # the requests that waited on the hung pod were served by it once released
            assert any(r[1]["x-inference-pod"] == hung.address for r in results)
        assert await _drained(st)


# --------------------------------------------------------------------------------------------- stale metrics
async def test_stale_metrics_are_not_saturation(fleet: SimFleet) -> None:
    # unhealthy_after is raised so failing scrapes leave the pods healthy-but-stale (the case under test);
    # the scrape timeout is above the injected delay so slow scrapes succeed late rather than fail.
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True, scheduler_args=["--unhealthy-after", "1000000", "--scrape-timeout", "10"])
    sheddable = {"x-gateway-inference-priority": "-1"}
    async with Stack(spec) as st, aiohttp.ClientSession() as s:
        staleness = st.server.handler.saturation.metrics_staleness_s
        for faults in ({"metrics_fail": True}, {"metrics_delay_s": staleness + 2.0}):
            for pod in fleet.pods:
                pod.set_faults(**faults)
            assert await wait_until(lambda: all(ep.metrics_age() > staleness for ep in st.server.pool.snapshot()), timeout_s=30)
            for i in range(10):
                status, headers, data = await post(s, st.url, "/v1/completions", _body(i, prefix=f"stale {faults}"), sheddable)
                assert status == 200, (faults, status, data)
            for pod in fleet.pods:
                pod.set_faults()
            assert await wait_until(lambda: all(ep.metrics_age() < staleness for ep in st.server.pool.snapshot()), timeout_s=30)
        assert await _drained(st)


async def test_failing_metrics_endpoint_takes_pod_out(fleet: SimFleet) -> None:
    """Default settings: a pod whose /metrics keeps failing is filtered (documented limit), the others serve."""
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], in_process=True)) as st, aiohttp.ClientSession() as s:
        bad = fleet.pods[0]
        bad.set_faults(metrics_fail=True)
        ep = st.server.pool.get(bad.address)
        assert await wait_until(lambda: not ep.healthy, timeout_s=10)
        for i in range(10):
            status, headers, _ = await post(s, st.url, "/v1/completions", _body(i, prefix=f"metrics fail {i}"))
            assert status == 200 and headers["x-inference-pod"] != bad.address
        bad.set_faults()
        assert await wait_until(lambda: ep.healthy, timeout_s=10)


# --------------------------------------------------------------------------------------------- scheduler restart
async def _load(s: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[tuple[float, int]]) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        status, _, _ = await post(s, url, "/v1/completions", _body(i, prefix="restart load"))
        out.append((time.monotonic(), status))
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["fail-close", "fail-open"])
async def test_scheduler_restart_under_load(fleet: SimFleet, mode: str) -> None:
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], failure_mode=mode, grpc_port=free_port())
    async with Stack(spec) as st, aiohttp.ClientSession() as s:
        stop = asyncio.Event()
        results: list[tuple[float, int]] = []
        workers = [asyncio.ensure_future(_load(s, st.url, stop, results)) for _ in range(3)]
        try:
            assert await wait_until(lambda: len(results) >= 15, timeout_s=30)
            t_kill = time.monotonic()  # requests finishing from here on may see the scheduler dying
            await st.stop_scheduler(hard=True)
            t_down = time.monotonic()
            assert await wait_until(lambda: sum(1 for t, _ in results if t > t_down + 0.2) >= 10, timeout_s=30)
            t_restart = time.monotonic()
            await st.start_scheduler()
            t_up = time.monotonic()
            # recovered: Envoy reconnects to the same port and requests route again
            assert await wait_until(lambda: sum(1 for t, c in results if t > t_up and c == 200) >= 10, timeout_s=60)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        during = [c for t, c in results if t_down + 0.2 < t < t_restart]
        assert during
        if mode == "fail-close":
            assert all(c >= 500 for c in during), collections.Counter(during)
        else:
            assert all(c == 200 for c in during), collections.Counter(during)
        assert all(c == 200 or c >= 500 for _, c in results)  # no transport errors, no hangs
        assert all(c == 200 for t, c in results if t < t_kill)


# --------------------------------------------------------------------------------------------- fallback + retry
async def test_fallback_endpoint_used_when_best_pod_dies(fleet: SimFleet, tmp_path: Path) -> None:
    cfg = tmp_path / "two-picks.yaml"
    cfg.write_text(
        "plugins:\n"
        "  - type: queue-scorer\n"
        "  - type: prefix-cache-scorer\n"
        "  - type: max-score-picker\n"
        "    parameters:\n"
        "      maxNumOfEndpoints: 2\n"
        "schedulingProfiles:\n"
        "  - name: default\n"
        "    plugins:\n"
        "      - pluginRef: queue-scorer\n"
        "        weight: 1\n"
        "      - pluginRef: prefix-cache-scorer\n"
        "        weight: 5\n"
        "      - pluginRef: max-score-picker\n"
    )
    # the scheduler must not notice the death before the request (that is the race a retry covers)
    spec = StackSpec(
        endpoints=fleet.endpoints, models=[MODEL], config=str(cfg), in_process=True,
        envoy_args={"fallback_retries": True, "endpoints": fleet.endpoints}, scheduler_args=["--unhealthy-after", "1000000"],
    )  # fmt: skip
    async with Stack(spec) as st, aiohttp.ClientSession() as s:
        prompt = "a long shared system prompt that pins the prefix to one pod " * 20
        status, headers, _ = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert status == 200
        best = headers["x-inference-pod"]
        await fleet.pod(best).kill()
        for i in range(5):
            status, headers, data = await post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": prompt + str(i), "max_tokens": 2})
            assert status == 200, data
            assert headers["x-inference-pod"] in fleet.endpoints and headers["x-inference-pod"] != best
        assert await _drained(st)


# --------------------------------------------------------------------------------------------- burst
BURST_CONFIG = """
# the default profile plus a per-pod in-flight cap at the pods' concurrency (tiny-cpu: max_num_seqs 8)
plugins:
  - type: inflight-limit-filter
    parameters: {maxInflight: 10}
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-cache-scorer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: inflight-limit-filter
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 3
"""


async def _burst(config: str) -> tuple[collections.Counter[str], list[str], bool]:
    """40 concurrent requests sharing one long prefix on 4 tiny-cpu pods (8 sequences each): per-pod counts."""
    async with SimFleet(FleetSpec(pods=4, profile="tiny-cpu", model=MODEL, time_scale=0.2, seed=3)) as fleet:
        async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL], config=config, in_process=True, scrape_interval_s=0.05)) as st:
            prefix = "You are a helpful assistant. Follow the policy below carefully. " * 30
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as s:
                results = await asyncio.gather(
                    *(post(s, st.url, "/v1/completions", {"model": MODEL, "prompt": prefix + f"question {i}", "max_tokens": 48}) for i in range(40))
                )
            assert all(r[0] == 200 for r in results), [r[0] for r in results]
            per_pod = collections.Counter(r[1].get("x-inference-pod", "") for r in results)
            assert set(per_pod) <= set(fleet.endpoints)
            return per_pod, list(fleet.endpoints), await _drained(st)


async def test_identical_prefix_burst_default_profile_piles_on() -> None:
    """The known limit of the reference default profile (docs/reliability.md, "Known limits" 1), measured: the
    prefix scorer (weight 3) pulls an identical-prefix burst onto the pod that got the first request, because the
    load scorers only see its queue after a scrape (min–max normalised, 2 + 2 < 3 until both turn) and the burst
    is scheduled within about one scrape interval. Measured here: all 40 on one pod. If this starts failing the
    default profile has changed; update the docs' limit with the new numbers."""
    per_pod, _, drained = await _burst("default")
    assert max(per_pod.values()) >= 30, dict(per_pod)
    assert drained


async def test_identical_prefix_burst_is_spread(tmp_path: Any) -> None:
    """The same burst with ``inflight-limit-filter`` in front of the default profile: it uses our own exact
    in-flight count, so no pod ever holds more than ``maxInflight`` (10) of the burst at once; 40 requests on
    4 pods then fill every pod."""
    cfg = tmp_path / "burst.yaml"
    cfg.write_text(BURST_CONFIG)
    per_pod, endpoints, drained = await _burst(str(cfg))
    # requests finish while the burst is still being scheduled, so a pod may serve a few more than 10 in
    # total; it never holds more than 10 at once. 40 on one pod (the default profile's pile-on) is far above.
    assert max(per_pod.values()) <= 16, dict(per_pod)
    assert len(per_pod) == 4, dict(per_pod)
    assert drained
