"""Active-active scheduler replicas through the real path: client → Envoy (ext_proc cluster of N replicas) →
``extproc serve`` × N sharing state through a real ``redis-server`` → simulated vLLM pods.

What the replicas must do (docs/active-active.md): agree on in-flight load (each one's debug view of every pod
carries the others' part), survive a replica's SIGKILL under load without a client seeing an error (fail-open
and fail-close), drop a dead replica's load within a second, and keep routing when Redis dies, catching up when
it returns. Bounds are generous where they only guard against hangs; the 1 s convergence is the issue's number
and is measured on the replica's own clock (the drop time it records), not by polling.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import aiohttp
import pytest

from extproc.harness import RedisProcess, Stack, StackSpec
from extproc.netutil import free_port
from extproc.sim.fleet import SimFleet
from reliability_lib import MODEL, wait_until

pytestmark = pytest.mark.envoy


@pytest.fixture(autouse=True)
def _redis_installed() -> None:
    try:
        RedisProcess.binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))  # conftest turns this into a failure under CI


def _body(i: int, max_tokens: int = 8, stream: bool = True) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"shared system prompt for the active-active test {i % 3} " + "lorem ipsum " * 12 + str(i),
            "max_tokens": max_tokens, "stream": stream}  # fmt: skip


async def _one(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    try:
        async with s.post(url + "/v1/completions", json=body) as r:
            data = await r.read()
            if r.status == 200 and body.get("stream") and b"[DONE]" not in data:
                print("CUT", r.status, dict(r.headers), data[-300:])
                return 0  # a cut stream is a lost request
            return r.status
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        print("ERR", repr(e))
        return 0


async def _load(s: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[tuple[float, float, int]], worker: int,
                max_tokens: int = 8) -> None:  # fmt: skip
    i = worker * 100_000
    while not stop.is_set():
        i += 1
        t0 = time.monotonic()
        status = await _one(s, url, _body(i, max_tokens))
        out.append((t0, time.monotonic(), status))


async def _get(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return await r.json()


async def _views(s: aiohttp.ClientSession, st: Stack) -> list[dict[str, dict[str, Any]]]:
    """Each live replica's /debug/endpoints, by pod address."""
    out = []
    for u in st.metrics_urls:
        out.append({e["address"]: e for e in await _get(s, u + "/debug/endpoints")})
    return out


async def _replication(s: aiohttp.ClientSession, st: Stack) -> list[dict[str, Any]]:
    return [await _get(s, u + "/debug/replication") for u in st.metrics_urls]


async def _all_connected(s: aiohttp.ClientSession, st: Stack, peers: int) -> bool:
    reps = await _replication(s, st)
    return all(r["connected"] and len(r["peers"]) == peers for r in reps)


def _spec(fleet: SimFleet, replicas: int = 2, failure_mode: str = "fail-close", **kw: Any) -> StackSpec:
    return StackSpec(endpoints=fleet.endpoints, models=[MODEL], config="prefix-load", failure_mode=failure_mode, replicas=replicas,
                     scrape_interval_s=0.05, **kw)  # fmt: skip


async def test_two_replicas_share_inflight_load(fleet: SimFleet) -> None:
    """Long streams routed by both replicas: each replica's view of every pod's in-flight count is the fleet's
    total (its own part + the peer's), and both views return to 0 when the streams end."""
    async with Stack(_spec(fleet)) as st, aiohttp.ClientSession() as s:
        assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20)
        n = 8
        tasks = [asyncio.ensure_future(_one(s, st.url, _body(i, max_tokens=400))) for i in range(n)]
        try:

            async def agreed() -> bool:
                views = await _views(s, st)
                totals = [sum(e["inflight"] for e in v.values()) for v in views]
                peers = [sum(e["inflight_peers"] for e in v.values()) for v in views]
                # both replicas routed some (Envoy round-robins the ext_proc streams) and both see all n
                return totals == [n, n] and all(0 < p < n for p in peers) and all(
                    views[0][a]["inflight"] == views[1][a]["inflight"] for a in views[0])

            assert await wait_until(agreed, timeout_s=20), await _views(s, st)
            codes = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        assert codes == [200] * n

        async def drained() -> bool:
            views = await _views(s, st)
            return all(e["inflight"] == 0 and e["inflight_peers"] == 0 for v in views for e in v.values())

        assert await wait_until(drained, timeout_s=10), await _views(s, st)
        reps = await _replication(s, st)
        # the access log reaches one replica per Envoy stream: some entries were forwarded to their owner
        assert sum(r["access_log"]["forwarded"] for r in reps) >= 1, reps


async def test_every_sampled_request_gives_its_owner_a_latency_sample(fleet: SimFleet) -> None:
    """Envoy opens each observation stream on whichever replica its cluster picks, so about half of them reach a
    replica that does not own the flight. That replica sends what it saw (TTFT, tokens, status) to the owner, and
    the owner records every sampled request's TTFT, as with one replica (before: ≈ 1/N of them)."""
    async with Stack(_spec(fleet, scheduler_args=["--observe-budget", "-1"])) as st, aiohttp.ClientSession() as s:
        assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20)
        n = 40
        codes = await asyncio.gather(*(_one(s, st.url, _body(i, max_tokens=6)) for i in range(n)))
        assert codes == [200] * n

        async def ttft_samples() -> float:
            total = 0.0
            for u in st.metrics_urls:
                async with s.get(u + "/metrics") as r:
                    total += _gauge(await r.text(), 'extproc_request_ttft_seconds_count{model="' + MODEL + '"}')
            return total

        async def all_sampled() -> bool:
            return await ttft_samples() == n

        assert await wait_until(all_sampled, timeout_s=10), (await ttft_samples(), await _replication(s, st))
        reps = await _replication(s, st)
        # some observation streams reached the other replica and were applied by their owner
        assert sum(r["observations"]["forwarded"] for r in reps) >= 1, reps
        assert sum(r["observations"]["applied"] for r in reps) == sum(r["observations"]["forwarded"] for r in reps), reps

        async def drained() -> bool:
            views = await _views(s, st)
            return all(e["inflight"] == 0 and e["inflight_peers"] == 0 for v in views for e in v.values())

        assert await wait_until(drained, timeout_s=10), await _views(s, st)


@pytest.mark.parametrize("mode", ["fail-close", "fail-open"])
async def test_kill_one_replica_under_load_loses_nothing(fleet: SimFleet, mode: str) -> None:
    async with Stack(_spec(fleet, failure_mode=mode)) as st, aiohttp.ClientSession() as s:
        assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20)
        stop = asyncio.Event()
        results: list[tuple[float, float, int]] = []
        workers = [asyncio.ensure_future(_load(s, st.url, stop, results, w, max_tokens=24)) for w in range(6)]
        try:
            assert await wait_until(lambda: len(results) >= 40, timeout_s=30)
            # both replicas carry load right before the kill
            assert await wait_until(lambda: _both_loaded(s, st), timeout_s=10)
            t_kill = time.monotonic()
            await st.kill_replica(1)
            n_kill = len(results)
            assert await wait_until(lambda: len(results) >= n_kill + 60, timeout_s=60)
            # the survivor dropped the dead replica's load within 1 s of the kill (its own record of the drop)
            assert await wait_until(lambda: _no_peers(s, st), timeout_s=10)
            rep = (await _replication(s, st))[0]
            drop_s = rep["last_peer_drop_monotonic"] - t_kill
            views = await _views(s, st)
            assert all(e["inflight_peers"] == 0 for e in views[0].values()), views
        finally:
            stop.set()
            await asyncio.gather(*workers)
        print(f"{mode}: {len(results)} requests, {len(results) - n_kill} after the kill; survivor dropped the dead replica's load {drop_s * 1000:.0f} ms after SIGKILL")
        assert collections.Counter(c for _, _, c in results) == {200: len(results)}, collections.Counter(c for _, _, c in results)
        assert 0 < drop_s <= 1.0, drop_s


async def _both_loaded(s: aiohttp.ClientSession, st: Stack) -> bool:
    views = await _views(s, st)
    return all(sum(e["inflight"] - e["inflight_peers"] for e in v.values()) > 0 for v in views)


async def _no_peers(s: aiohttp.ClientSession, st: Stack) -> bool:
    return all(not r["peers"] for r in await _replication(s, st))


async def test_redis_killed_routing_continues_and_recovers(fleet: SimFleet) -> None:
    port = free_port()
    redis = await RedisProcess.start(port)
    try:
        async with Stack(_spec(fleet, shared_state=redis.url)) as st, aiohttp.ClientSession() as s:
            assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20)
            stop = asyncio.Event()
            results: list[tuple[float, float, int]] = []
            workers = [asyncio.ensure_future(_load(s, st.url, stop, results, w)) for w in range(4)]
            try:
                assert await wait_until(lambda: len(results) >= 30, timeout_s=30)
                await redis.kill()
                t_down = time.monotonic()

                async def isolated() -> bool:
                    reps = await _replication(s, st)
                    return all(not r["connected"] and not r["peers"] for r in reps)

                assert await wait_until(isolated, timeout_s=10), await _replication(s, st)
                # routing goes on, each replica on its own state
                assert await wait_until(lambda: sum(1 for t0, _, _ in results if t0 > t_down + 0.5) >= 30, timeout_s=30)
                redis = await RedisProcess.start(port)
                t_up = time.monotonic()
                assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20), await _replication(s, st)
                reconnect_s = time.monotonic() - t_up
                assert await wait_until(lambda: sum(1 for t0, _, _ in results if t0 > t_up) >= 30, timeout_s=30)
            finally:
                stop.set()
                await asyncio.gather(*workers)

            async def converged() -> bool:
                views = await _views(s, st)
                return all(e["inflight"] == 0 and e["inflight_peers"] == 0 for v in views for e in v.values())

            # 30 s, not 10: in one full-suite run on 2 busy cores a flight stayed counted past 10 s (not reproduced
            # here in 7 runs, 4 of them beside 3 busy loops); a flight that leaked for good still fails here
            assert await wait_until(converged, timeout_s=30), (await _views(s, st), await _replication(s, st))
            reps = await _replication(s, st)
            print(f"redis down→up: {len(results)} requests, reconnected {reconnect_s * 1000:.0f} ms after redis came back; connects {[r['connects'] for r in reps]}")
            assert all(r["connects"] >= 2 for r in reps)
            assert collections.Counter(c for _, _, c in results) == {200: len(results)}, collections.Counter(c for _, _, c in results)
    finally:
        await redis.stop()


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


async def test_precise_prefix_every_replica_subscribes_to_every_pod() -> None:
    """Precise prefix routing with 2 replicas: each replica runs its own ZMQ subscriber per pod and indexes every
    pod's KV events, so both hold the same view (nothing of it goes through Redis)."""
    from extproc.sim.fleet import FleetSpec

    async with SimFleet(FleetSpec(pods=3, profile="llama3-8b-h100", model=MODEL, time_scale=0.05, seed=2, kv_events=True)) as fleet:
        spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], config="precise-prefix", kv_events=fleet.kv_events, replicas=2,
                         scheduler_args=["--tokenizer", f"{MODEL}=sim"], scrape_interval_s=0.05)  # fmt: skip
        async with Stack(spec) as st, aiohttp.ClientSession() as s:
            assert await wait_until(lambda: _all_connected(s, st, 1), timeout_s=20)
            codes = await asyncio.gather(*(_one(s, st.url, _body(i, max_tokens=4)) for i in range(24)))
            assert codes == [200] * 24

            async def same_events() -> bool:
                texts = []
                for u in st.metrics_urls:
                    async with s.get(u + "/metrics") as r:
                        texts.append(await r.text())
                ev = [_gauge(t, "extproc_kv_events_events") for t in texts]
                subs = [_gauge(t, "extproc_kv_events_subscribers") for t in texts]
                return subs == [3.0, 3.0] and ev[0] > 0 and ev[0] == ev[1]

            assert await wait_until(same_events, timeout_s=20)


def test_demo_replicas_kill_replica(tmp_path: Any) -> None:
    """``extproc demo --replicas 2 --kill-replica`` in fail-close: the last replica is SIGKILLed halfway, every
    request succeeds and is served by a scheduler pick — a request caught inside the killed replica's decision
    window is decided again by the other replica (the decision retry, docs/active-active.md) — and the survivor
    drops the dead replica within 1 s."""
    import json
    import subprocess
    import sys

    rep = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "extproc", "demo", "--pods", "3", "--requests", "80", "--time-scale", "0.05", "--replicas", "2", "--kill-replica",
         "--failure-mode", "fail-close", "--report", str(rep)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rep.exists(), p.stderr[-3000:]
    r = json.loads(rep.read_text())
    why = {"failures": r["failures"], "served_as_picked": r["served_as_picked"], "fell_back": r.get("fell_back"),
           "not_served_as_picked": r["not_served_as_picked"], "checks": {k: v for k, v in r["error_checks"].items() if not v["ok"]},
           "decision_retries": r["replicas"].get("decision_retries")}
    assert p.returncode == 0, why
    assert r["ok"] == r["requests"] == 80 and r["failed"] == 0, why
    assert r["served_as_picked"] == 80 and r["fell_back"] == 0, why
    assert r["replicas"]["count"] == 2 and r["replicas"]["killed"] == 1 and 0 < r["replicas"]["killed_after_requests"] < 80
    assert r["replicas"]["decision_retries"] is not None  # Envoy's counter of the retry cluster (it exists)
    live = r["replicas"]["live"]
    assert len(live) == 1 and live[0]["connected"] and live[0]["dropped_peers"] >= 1 and not live[0]["peers"]
    assert 0 < r["replicas"]["dead_replica_dropped_after_ms"] <= 1000
