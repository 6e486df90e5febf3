"""``extproc bench overhead``: what the scheduler adds on the request path.

1. Envoy alone (ROUND_ROBIN) vs Envoy + extproc (default profile), both over the same simulated pods, at 1 and
   16 connections, interleaved in one run (envoy, extproc, envoy, extproc, ...). The pods run with
   ``time_scale=0.001`` and requests ask for one token from a short prompt, so the upstream answers in well under
   a millisecond of simulated time and the measurement is dominated by the proxy path (Envoy + ext_proc round
   trips + scheduling), not by the model. The load generator is a closed-loop aiohttp client in its own process
   (one keep-alive connection per worker), so it never shares an event loop with the scheduler or the fleet.
2. In-process decision latency (parse → schedule → pre-request hooks) of the default profile vs pod count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import time
from typing import Any

from extproc.bench.report import percentile

log = logging.getLogger(__name__)

_BODY = json.dumps({"model": "sim-llama", "prompt": "overhead probe: the quick brown fox", "max_tokens": 1}).encode()


def _client_proc(url: str, connections: int, duration: float, q: Any) -> None:
    """Closed-loop load: ``connections`` workers, each sends the next request when the previous one is done."""
    import aiohttp

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        errors = 0
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as s:
            # warm-up: open the connections, let the scheduler see the pods' metrics
            for _ in range(3):
                async with s.post(url + "/v1/completions", data=_BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
            end = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    try:
                        async with s.post(url + "/v1/completions", data=_BODY, headers={"content-type": "application/json"}) as r:
                            await r.read()
                            ok = r.status == 200
                    except aiohttp.ClientError:
                        ok = False
                    if ok:
                        lat.append((time.perf_counter() - t) * 1000.0)
                    else:
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - t0
        return {"latencies": lat, "errors": errors, "elapsed": elapsed}

    try:
        import uvloop

        q.put(uvloop.run(main()))
    except Exception as e:  # report to the parent instead of hanging it
        q.put({"error": f"{type(e).__name__}: {e}"})


def measure(url: str, connections: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_client_proc, args=(url, connections, duration, q), daemon=True)
    p.start()
    try:
        res = q.get(timeout=duration + 60)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if "error" in res:
        raise RuntimeError(res["error"])
    lat = res["latencies"]
    return {
        "requests": len(lat),
        "errors": res["errors"],
        "rps": round(len(lat) / res["elapsed"], 1),
        "p50_ms": round(percentile(lat, 50), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
    }


def decision_latency(pods: int, requests: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Parse + schedule + pre-request hooks of the default profile over ``pods`` endpoints with varied metrics."""
    from extproc.api import parse_request
    from extproc.bench.workloads import generate, parse_stages
    from extproc.datalayer.endpoint import EndpointPool, PodMetrics
    from extproc.scheduling.config import load_config

    rng = random.Random(seed)
    pool = EndpointPool(default_models=frozenset({"sim-llama"}))
    pool.set_endpoints([f"10.{i // 250}.{i % 250}.1:8000" for i in range(pods)])
    now = time.monotonic()
    for ep in pool.snapshot():
        ep.metrics = PodMetrics(waiting=rng.randint(0, 10), running=rng.randint(0, 64), kv_usage=rng.random(), updated_at=now)
    sched = load_config("default", pool).scheduler
    wl = generate("shared-prefix", parse_stages(f"{requests}:1.5"), seed=seed)
    bodies = [(r.path, r.body_bytes(), r.headers()) for r in wl.requests[:requests]]
    times: list[float] = []
    for path, raw, headers in bodies:
        t = time.perf_counter()
        req = parse_request(path, raw, headers)
        result, cycle = sched.schedule(req)
        sched.dispatched(cycle, req, result)
        times.append((time.perf_counter() - t) * 1e6)
    return {"pods": pods, "requests": len(times), "p50_us": round(percentile(times, 50), 1), "p99_us": round(percentile(times, 99), 1)}


async def _proxy_runs(pods: int, duration: float, connections: list[int]) -> list[dict[str, Any]]:
    from extproc.harness import Stack, StackSpec, start_sim_process, stop_process

    proc, info = await start_sim_process(["--pods", str(pods), "--base-port", "0", "--time-scale", "0.001"])
    rows: list[dict[str, Any]] = []
    try:
        eps = list(info["endpoints"])
        async with Stack(StackSpec(endpoints=eps, config=None, lb_policy="ROUND_ROBIN")) as envoy, Stack(
            StackSpec(endpoints=eps, config="default", models=["sim-llama"])
        ) as ext:
            loop = asyncio.get_running_loop()
            for c in connections:
                for name, url in (("envoy-rr", envoy.url), ("envoy+extproc", ext.url)):
                    m = await loop.run_in_executor(None, measure, url, c, duration)
                    rows.append({"setup": name, "connections": c, **m})
    finally:
        await stop_process(proc)
    return rows


def run_overhead(pods: int, duration: float, connections: list[int], decision_pods: list[int], out_dir: str) -> int:
    rows = asyncio.run(_proxy_runs(pods, duration, connections))
    print(f"Proxy path: {pods} simulated pods (time_scale 0.001, 1 output token), closed-loop aiohttp client in its own process")
    print("| setup | connections | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['connections']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    ratios = []
    for c in connections:
        a = next(r for r in rows if r["setup"] == "envoy-rr" and r["connections"] == c)
        b = next(r for r in rows if r["setup"] == "envoy+extproc" and r["connections"] == c)
        ratio = {
            "connections": c,
            "rps_ratio": round(b["rps"] / a["rps"], 3) if a["rps"] else None,
            "added_p50_ms": round(b["p50_ms"] - a["p50_ms"], 3) if a["p50_ms"] is not None and b["p50_ms"] is not None else None,
            "added_p99_ms": round(b["p99_ms"] - a["p99_ms"], 3) if a["p99_ms"] is not None and b["p99_ms"] is not None else None,
        }
        ratios.append(ratio)
        print(f"connections {c}: extproc/envoy req/s = {ratio['rps_ratio']}, added p50 {ratio['added_p50_ms']} ms, added p99 {ratio['added_p99_ms']} ms")
    print()
    print("In-process decision latency (parse + schedule + pre-request), default profile:")
    print("| pods | p50 µs | p99 µs |")
    print("|---|---|---|")
    decisions = []
    for n in decision_pods:
        d = decision_latency(n)
        decisions.append(d)
        print(f"| {d['pods']} | {d['p50_us']} | {d['p99_us']} |")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "overhead.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"pods": pods, "duration_s": duration, "proxy": rows, "ratios": ratios, "decision": decisions}, f, indent=2)
    print(f"wrote {path}")
    return 0
