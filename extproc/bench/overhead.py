"""``extproc bench overhead``: what the scheduler adds on the request path.

1. Proxy path. Envoy alone (ROUND_ROBIN over the pods) vs Envoy + extproc (default profile; ``--response-observe``
   ``observability`` and ``none``), at 1 and 16 connections, interleaved (every setup once per connection count per
   round, order rotated each round) for ``rounds`` rounds. All stacks are started once and stay up; each run reads
   the CPU seconds of the scheduler and of both Envoys from ``/proc/PID/stat`` before and after, and subtracts the
   idle CPU (scrape loop, timers) measured before any load, so ``sched_us`` is the scheduler's cost per request.

   Upstream (``upstream``):
   - ``fake`` (default): :class:`extproc.bench.fakepods.FakePods`, one Envoy answering every pod with a
     ``direct_response`` (completion JSON with usage, vLLM ``/metrics``, ``/v1/models``): a few µs per request.
   - ``sim``: the Python vLLM simulator (``time_scale`` 0.001, one output token): realistic answers, but it eats
     most of a core, so on a small machine it hides what the proxy and scheduler cost.

   Load generator (``client``): ``wrk`` (C, one thread, closed loop, keep-alive, a Lua script for the POST body
   and a JSON summary of latency percentiles) when it is on PATH, else the closed-loop aiohttp client in its own
   process (it costs ~10× more CPU per request than wrk, so it competes with what is measured; the output says so).
2. In-process decision latency (parse → schedule → pre-request hooks) of the default profile vs pod count.

Run: ``extproc bench overhead`` or ``python -m extproc.bench.overhead --upstream fake --client wrk --rounds 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from extproc.bench.report import percentile
from extproc.contract import RESPONSE_OBSERVE_MODES

log = logging.getLogger(__name__)

MODEL = "sim-llama"
_BODY = json.dumps({"model": MODEL, "prompt": "overhead probe: the quick brown fox", "max_tokens": 1}).encode()
_PATH = "/v1/completions"
_TICK = os.sysconf("SC_CLK_TCK")
OBSERVE_MODES: tuple[str, ...] = ("observability", "none")


# ---------------------------------------------------------------------------------------------------- CPU accounting


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---------------------------------------------------------------------------------------------------- load: aiohttp


def _client_proc(url: str, connections: int, duration: float, q: Any) -> None:
    """Closed-loop load: ``connections`` workers, each sends the next request when the previous one is done."""
    import aiohttp

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        errors = 0
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as s:
            # warm-up: open a connection, let the scheduler see the pods' metrics
            for _ in range(3):
                async with s.post(url + _PATH, data=_BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
            end = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    try:
                        async with s.post(url + _PATH, data=_BODY, headers={"content-type": "application/json"}) as r:
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
    """Closed-loop aiohttp load (a spawned process) → requests, errors, rps, p50_ms, p99_ms. Blocking."""
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


# ---------------------------------------------------------------------------------------------------- load: wrk

_WRK_MARK = "WRKJSON "


def wrk_binary() -> str | None:
    """Path of ``wrk`` (env ``EXTPROC_WRK`` overrides), or None when it is not installed."""
    return os.environ.get("EXTPROC_WRK") or shutil.which("wrk")


def wrk_script(body: bytes) -> str:
    """Lua for wrk: POST ``body`` as JSON; ``done()`` prints one ``WRKJSON {...}`` line (latencies in µs)."""
    text = body.decode()
    eq = "=" * 4
    while f"]{eq}]" in text:
        eq += "="
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [{eq}[{text}]{eq}]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        f'  io.write(string.format("{_WRK_MARK}'
        '{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,'
        '\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}\\n",\n'
        "    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,\n"
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))\n"
        "end\n"
    )


def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The ``WRKJSON`` line of a wrk run → requests (2xx/3xx), errors, rps, p50_ms, p99_ms."""
    for line in stdout.splitlines():
        if line.startswith(_WRK_MARK):
            d = json.loads(line[len(_WRK_MARK) :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    bad = int(d["status"])  # non-2xx/3xx responses (still counted in summary.requests)
    ok = max(0, int(d["requests"]) - bad)
    errors = bad + int(d["connect"]) + int(d["read"]) + int(d["write"]) + int(d["timeout"])
    secs = max(int(d["duration_us"]), 1) / 1e6
    return {
        "requests": ok,
        "errors": errors,
        "rps": round(ok / secs, 1),
        "p50_ms": round(int(d["p50_us"]) / 1000.0, 3) if d["requests"] else None,
        "p99_ms": round(int(d["p99_us"]) / 1000.0, 3) if d["requests"] else None,
    }


async def run_wrk(url: str, connections: int, duration: float, body: bytes = _BODY, path: str = _PATH) -> dict[str, Any]:
    """One closed-loop wrk run (one thread, ``connections`` keep-alive connections)."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="extproc-wrk-") as wd:
        script = os.path.join(wd, "post.lua")
        with open(script, "w", encoding="utf-8") as f:
            f.write(wrk_script(body))
        secs = max(1, round(duration))
        proc = await asyncio.create_subprocess_exec(
            binary, "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", "5s", "-s", script, url + path,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), secs + 30)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError("wrk did not finish") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text[-2000:]}")
    return parse_wrk_output(text)


async def load(client: str, url: str, connections: int, duration: float) -> dict[str, Any]:
    if client == "wrk":
        return await run_wrk(url, connections, duration)
    return await asyncio.get_running_loop().run_in_executor(None, measure, url, connections, duration)


# ---------------------------------------------------------------------------------------------------- decision latency


def decision_latency(pods: int, requests: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Parse + schedule + pre-request hooks of the default profile over ``pods`` endpoints with varied metrics."""
    from extproc.api import parse_request
    from extproc.bench.workloads import generate, parse_stages
    from extproc.datalayer.endpoint import EndpointPool, PodMetrics
    from extproc.scheduling.config import load_config

    rng = random.Random(seed)
    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints([f"10.{i // 250}.{i % 250}.1:8000" for i in range(pods)])
    now = time.monotonic()
    for ep in pool.snapshot():
        ep.set_metrics(PodMetrics(waiting=rng.randint(0, 10), running=rng.randint(0, 64), kv_usage=rng.random(), updated_at=now))
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


# ---------------------------------------------------------------------------------------------------- proxy runs


# Extra scheduler variants an overhead run can compare (``--variants``): name → (response-observe mode, extra
# ``extproc serve`` arguments). ``extproc-<mode>`` (from ``--observe``) is always the default transport.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "observability-nowait": ("observability", ()),  # + Envoy: send_body_without_waiting_for_header_response
    "observability-all": ("observability", ("--observe-budget", "-1")),  # observation stream on every request
    "observability-grpcio": ("observability", ("--grpc-server", "grpcio")),
    # what observability mode was before (grpcio, the observation stream on every request)
    "observability-all-grpcio": ("observability", ("--grpc-server", "grpcio", "--observe-budget", "-1")),
    "none-grpcio": ("none", ("--grpc-server", "grpcio")),
    "observability-fixed-scrape": ("observability", ("--scrape-adaptive", "off")),
    # active-active: N scheduler replicas behind Envoy's ext_proc cluster sharing state through Redis (the
    # scheduler tier's throughput ratio vs one replica; sched_us sums every replica's CPU)
    "observability-r2": ("observability", ()),
    "observability-r3": ("observability", ()),
}


def variant_replicas(name: str) -> int:
    """``...-rN`` → N scheduler replicas (1 otherwise)."""
    head, sep, n = name.rpartition("-r")
    return int(n) if sep and head and n.isdigit() else 1


@dataclass(slots=True)
class OverheadOptions:
    pods: list[int] = field(default_factory=lambda: [8])
    duration: float = 3.0
    connections: list[int] = field(default_factory=lambda: [1, 16])
    rounds: int = 2
    upstream: str = "fake"  # fake | sim
    client: str = "auto"  # auto | wrk | aiohttp
    observe: list[str] = field(default_factory=lambda: list(OBSERVE_MODES))
    decision_pods: list[int] = field(default_factory=lambda: [8, 32, 128, 512])
    out_dir: str = "bench-out"
    variants: list[str] = field(default_factory=list)
    live_decisions: int = 1000  # decisions measured with the data layer live (200/s), per pod count


def resolve_client(requested: str) -> tuple[str, str | None]:
    """(client to use, note for the output or None). ``auto``/``wrk`` fall back to aiohttp when wrk is absent."""
    if requested == "aiohttp":
        return "aiohttp", None
    if wrk_binary() is not None:
        return "wrk", None
    return "aiohttp", (
        "NOTE: wrk is not installed (apt-get install -y wrk); falling back to the Python aiohttp client, which costs "
        "~10x more CPU per request than wrk and competes with the proxy and the scheduler on a small machine: "
        "the req/s below understate both setups."
    )


def _setup_names(observe: list[str], variants: list[str] | None = None) -> list[str]:
    return ["envoy-rr", *(f"extproc-{m}" for m in observe), *(f"extproc-{v}" for v in variants or [])]


async def _warm(url: str, n: int = 20, attempts: int = 50) -> None:
    """``n`` successful requests (opens the connections, lets the scheduler see the pods); a few transient failures
    while a freshly started stack settles (hundreds of pods being scraped for the first time) are retried."""
    import aiohttp

    ok = 0
    last = ""
    async with aiohttp.ClientSession() as s:
        for _ in range(attempts):
            async with s.post(url + _PATH, data=_BODY, headers={"content-type": "application/json"}) as r:
                body = await r.read()
                if r.status == 200:
                    ok += 1
                    if ok >= n:
                        return
                    continue
                last = f"{r.status}: {body[:300]!r}"
            await asyncio.sleep(0.2)
    raise RuntimeError(f"warm-up requests to {url} kept failing ({ok}/{n} ok), last answer {last}")


async def _proxy_runs(opts: OverheadOptions, client: str, pods_n: int) -> dict[str, Any]:
    """All setups over ``pods_n`` pods: idle CPU, interleaved runs, and decision latency with the data layer live."""
    from extproc.bench.fakepods import FakePods
    from extproc.harness import Stack, StackSpec, start_sim_process, stop_process

    rows: list[dict[str, Any]] = []
    idle_cores: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as es:
        upstream_pid: int | None = None
        if opts.upstream == "fake":
            pods = await es.enter_async_context(FakePods(pods_n, models=[MODEL]))
            eps = list(pods.endpoints)
            assert pods.envoy is not None
            upstream_pid = pods.envoy.pid
        else:
            proc, info = await start_sim_process(["--pods", str(pods_n), "--base-port", "0", "--time-scale", "0.001"])
            es.push_async_callback(stop_process, proc)
            eps = list(info["endpoints"])
            upstream_pid = proc.pid
        stacks: dict[str, Stack] = {}
        stacks["envoy-rr"] = await es.enter_async_context(Stack(StackSpec(endpoints=eps, config=None, lb_policy="ROUND_ROBIN")))
        specs: list[tuple[str, str, tuple[str, ...]]] = [(f"extproc-{m}", m, ()) for m in opts.observe]
        specs += [(f"extproc-{v}", *VARIANTS[v]) for v in opts.variants]
        for name, mode, extra in specs:
            envoy_args = {"body_without_header_wait": True} if name.endswith("-nowait") else {}
            spec = StackSpec(endpoints=eps, config="default", models=[MODEL], response_observe=mode, scheduler_args=list(extra), envoy_args=envoy_args,
                             replicas=variant_replicas(name))  # fmt: skip
            stacks[name] = await es.enter_async_context(Stack(spec))
        for st in stacks.values():
            await _warm(st.url)

        def pids_of(name: str) -> dict[str, int]:
            st = stacks[name]
            assert st.envoy is not None
            p = {"envoy": st.envoy.pid}
            if st.scheduler is not None:
                p["sched"] = st.scheduler.proc.pid
            for i, rp in enumerate(st.schedulers[1:], 1):  # more replicas: their CPU adds to sched_us
                if rp is not None:
                    p[f"sched{i}"] = rp.proc.pid
            if upstream_pid is not None:
                p["pods"] = upstream_pid
            return p

        # idle CPU of every process, all stacks up, no load (scrape loops, timers): subtracted from each run. The
        # first seconds after the warm-up still have every pod "active" (just dispatched to): wait them out, as a
        # scheduler that has been idle for a while would be.
        await asyncio.sleep(3.0)
        all_pids = {f"{n}:{k}": pid for n in stacks for k, pid in pids_of(n).items()}
        idle_s = 3.0
        c0 = {k: cpu_seconds(p) for k, p in all_pids.items()}
        await asyncio.sleep(idle_s)
        idle_cores = {k: round((cpu_seconds(p) - c0[k]) / idle_s, 4) for k, p in all_pids.items()}

        names = list(stacks)
        loop = asyncio.get_running_loop()
        for rnd in range(opts.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for c in opts.connections:
                for name in order:
                    pids = pids_of(name)
                    # the pods process is shared by all stacks: its idle rate is the sum of every scheduler's scraping
                    idle = {k: idle_cores[f"{name}:{k}"] for k in pids}
                    c0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    t0 = loop.time()
                    m = await load(client, stacks[name].url, c, opts.duration)
                    wall = loop.time() - t0
                    used = {k: cpu_seconds(p) - c0[k] for k, p in pids.items()}
                    n = max(1, m["requests"])
                    row: dict[str, Any] = {"setup": name, "connections": c, "round": rnd, "pods": pods_n, **m}
                    for k in pids:
                        row[f"{k}_us"] = round(max(0.0, used[k] - idle[k] * wall) / n * 1e6, 1)
                    extra_sched = [k for k in pids if k.startswith("sched") and k != "sched"]
                    if extra_sched:
                        row["sched_us"] = round(sum(row[f"{k}_us"] for k in ("sched", *extra_sched)), 1)
                    rows.append(row)
                    log.info("overhead run %s", row)
        live = await decision_latency_live(eps, opts.live_decisions) if opts.upstream == "fake" else None
    return {"pods": pods_n, "runs": rows, "idle_cores": idle_cores, "decision_live": live}


async def decision_latency_live(endpoints: list[str], requests: int = 1000, rate: float = 200.0, seed: int = 0) -> dict[str, Any]:
    """Decision latency of the default profile *with the data layer live*: the same scraper ``extproc serve`` runs
    polls ``endpoints`` on this event loop while decisions arrive at ``rate`` per second (each dispatch touches its
    pod and holds one in-flight slot for 50 ms, so pods are active as under load). ``p50_us``/``p99_us``: the
    decision itself (wall clock); ``cpu_*``: its CPU time; ``lag_p99_us``: from the decision's due time to its end (includes waiting for the loop, i.e.
    what scraping on the same loop delays)."""
    from extproc.api import parse_request
    from extproc.bench.workloads import generate, parse_stages
    from extproc.datalayer.endpoint import EndpointPool
    from extproc.datalayer.scrape import MetricsScraper
    from extproc.scheduling.config import load_config

    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints(endpoints)
    scraper = MetricsScraper(pool)
    await scraper.start()
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 20.0
        while loop.time() < deadline and any(ep.metrics.updated_at == 0.0 for ep in pool.snapshot()):
            await asyncio.sleep(0.05)
        sched = load_config("default", pool).scheduler
        wl = generate("shared-prefix", parse_stages(f"{requests}:1.5"), seed=seed)
        bodies = [(r.path, r.body_bytes(), r.headers()) for r in wl.requests[:requests]]
        compute: list[float] = []
        cpu: list[float] = []
        lag: list[float] = []
        scrapes0 = scraper.scrapes
        t_start = loop.time()

        def release(ep: Any) -> None:
            ep.release_inflight()

        for i, (path, raw, headers) in enumerate(bodies):
            due = t_start + i / rate
            delay = due - loop.time()
            await asyncio.sleep(max(0.0, delay))  # yields to the scraper even when behind
            c = time.thread_time()
            t = time.perf_counter()
            req = parse_request(path, raw, headers)
            result, cycle = sched.schedule(req)
            ep = result.primary
            ep.add_inflight(0)
            scraper.touch(ep)
            sched.dispatched(cycle, req, result)
            loop.call_later(0.05, release, ep)
            end = time.perf_counter()
            cpu.append((time.thread_time() - c) * 1e6)
            compute.append((end - t) * 1e6)
            lag.append(max(0.0, (loop.time() - due)) * 1e6)
        elapsed = loop.time() - t_start
        await asyncio.sleep(0.06)
        return {
            "pods": len(endpoints),
            "requests": len(compute),
            "rate": rate,
            "p50_us": round(percentile(compute, 50), 1),
            "p99_us": round(percentile(compute, 99), 1),
            # CPU time of the decision (excludes preemption by other processes on a shared machine)
            "cpu_p50_us": round(percentile(cpu, 50), 1),
            "cpu_p99_us": round(percentile(cpu, 99), 1),
            "lag_p50_us": round(percentile(lag, 50), 1),
            "lag_p99_us": round(percentile(lag, 99), 1),
            "scrapes_per_s": round((scraper.scrapes - scrapes0) / elapsed, 1),
        }
    finally:
        await scraper.stop()


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize(
    rows: list[dict[str, Any]], observe: list[str], connections: list[int], variants: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Median over rounds per (setup, connections), and extproc-vs-envoy ratios per connection count."""
    table: list[dict[str, Any]] = []
    for c in connections:
        for name in _setup_names(observe, variants):
            rs = [r for r in rows if r["setup"] == name and r["connections"] == c]
            if not rs:
                continue
            rps = [r["rps"] for r in rs]
            table.append(
                {
                    "setup": name,
                    "connections": c,
                    "rounds": len(rs),
                    "rps": _median(rs, "rps"),
                    "rps_min": min(rps),
                    "rps_max": max(rps),
                    "p50_ms": _median(rs, "p50_ms"),
                    "p99_ms": _median(rs, "p99_ms"),
                    "sched_us": _median(rs, "sched_us"),
                    "envoy_us": _median(rs, "envoy_us"),
                    "pods_us": _median(rs, "pods_us"),
                    "errors": sum(r["errors"] for r in rs),
                }
            )
    ratios: list[dict[str, Any]] = []
    for c in connections:
        base = next((t for t in table if t["setup"] == "envoy-rr" and t["connections"] == c), None)
        if base is None:
            continue
        for name in _setup_names(observe, variants)[1:]:
            t = next((t for t in table if t["setup"] == name and t["connections"] == c), None)
            if t is None:
                continue

            def diff(k: str, a: dict[str, Any] = base, b: dict[str, Any] = t) -> float | None:
                return round(b[k] - a[k], 3) if a[k] is not None and b[k] is not None else None

            ratios.append(
                {
                    "setup": t["setup"],
                    "connections": c,
                    "rps_ratio": round(t["rps"] / base["rps"], 3) if base["rps"] else None,
                    "added_p50_ms": diff("p50_ms"),
                    "added_p99_ms": diff("p99_ms"),
                }
            )
    return table, ratios


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def run_overhead(
    pods: int | list[int],
    duration: float,
    connections: list[int],
    decision_pods: list[int],
    out_dir: str,
    *,
    rounds: int = 2,
    upstream: str = "fake",
    client: str = "auto",
    observe: list[str] | None = None,
    variants: list[str] | None = None,
) -> int:
    opts = OverheadOptions(
        pods=[pods] if isinstance(pods, int) else list(pods),
        duration=duration,
        connections=connections,
        rounds=rounds,
        upstream=upstream,
        client=client,
        observe=list(observe) if observe is not None else list(OBSERVE_MODES),
        decision_pods=decision_pods,
        out_dir=out_dir,
        variants=list(variants or []),
    )
    return run(opts)


def parse_pods(text: str | int) -> list[int]:
    """``--pods 8,64,512`` → [8, 64, 512]."""
    if isinstance(text, int):
        return [text]
    return [int(x) for x in str(text).split(",") if x.strip()]


def _print_pods(res: dict[str, Any], opts: OverheadOptions, client: str) -> None:
    n = res["pods"]
    upstream = (
        f"{n} fake pods (one Envoy --concurrency 1, direct_response)"
        if opts.upstream == "fake"
        else f"{n} simulated pods (Python simulator, time_scale 0.001, 1 output token)"
    )
    client_txt = "wrk -t1 (closed loop, keep-alive)" if client == "wrk" else "closed-loop aiohttp client in its own process"
    print(f"## {n} pods. Proxy path: {upstream}; client {client_txt}; front Envoy --concurrency 1; {opts.rounds} rounds x "
          f"{opts.duration:g} s, interleaved; medians over rounds (req/s min-max in brackets)")  # fmt: skip
    print("| setup | connections | req/s | p50 ms | p99 ms | scheduler CPU µs/req | front Envoy µs/req | pods µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in res["proxy"]:
        print(
            f"| {t['setup']} | {t['connections']} | {t['rps']} [{t['rps_min']}-{t['rps_max']}] | {_fmt(t['p50_ms'])} | {_fmt(t['p99_ms'])} | "
            f"{_fmt(t['sched_us'])} | {_fmt(t['envoy_us'])} | {_fmt(t['pods_us'])} | {t['errors']} |"
        )
    for r in res["ratios"]:
        print(f"{n} pods: {r['setup']} vs envoy-rr at {r['connections']} connection(s): req/s ratio {_fmt(r['rps_ratio'])}, "
              f"added p50 {_fmt(r['added_p50_ms'])} ms, added p99 {_fmt(r['added_p99_ms'])} ms")  # fmt: skip
    idle = res["idle_cores"]
    scheds = ", ".join(f"{k.split(':')[0]} {v:.3f}" for k, v in idle.items() if k.endswith(":sched"))
    print(f"{n} pods: idle CPU (cores) before load, per scheduler process: {scheds}")
    live = res.get("decision_live")
    if live:
        print(f"{n} pods: decision latency with the data layer live ({live['rate']:g}/s, {live['scrapes_per_s']} scrapes/s): "
              f"p50 {live['p50_us']} µs, p99 {live['p99_us']} µs (CPU time p50 {live['cpu_p50_us']}, p99 {live['cpu_p99_us']} µs); "
              f"due-to-done p99 {live['lag_p99_us']} µs")  # fmt: skip
    print()


def run(opts: OverheadOptions) -> int:
    if opts.upstream not in ("fake", "sim") or opts.client not in ("auto", "wrk", "aiohttp"):
        print("extproc bench overhead: --upstream is fake|sim, --client is auto|wrk|aiohttp", file=sys.stderr)
        return 2
    bad = [m for m in opts.observe if m not in RESPONSE_OBSERVE_MODES]
    bad += [v for v in opts.variants if v not in VARIANTS]
    if bad or opts.rounds < 1 or opts.duration <= 0 or not opts.connections or not opts.pods or min(opts.pods) < 1:
        print("extproc bench overhead: need --rounds >= 1, --duration > 0, --pods N[,N...] >= 1, connections, observe in "
              f"observability|streamed|none, variants in {','.join(VARIANTS)}", file=sys.stderr)  # fmt: skip
        return 2
    client, note = resolve_client(opts.client)
    if note:
        print(note)
    per_pods: list[dict[str, Any]] = []
    for n in opts.pods:
        res = asyncio.run(_proxy_runs(opts, client, n))
        res["proxy"], res["ratios"] = summarize(res["runs"], opts.observe, opts.connections, opts.variants)
        per_pods.append(res)
        _print_pods(res, opts, client)
    print("In-process decision latency (parse + schedule + pre-request; no data layer running), default profile:")
    print("| pods | p50 µs | p99 µs |")
    print("|---|---|---|")
    decisions = []
    for n in opts.decision_pods:
        d = decision_latency(n)
        decisions.append(d)
        print(f"| {d['pods']} | {d['p50_us']} | {d['p99_us']} |")
    os.makedirs(opts.out_dir, exist_ok=True)
    path = os.path.join(opts.out_dir, "overhead.json")
    first = per_pods[0]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "pods": opts.pods,
                "duration_s": opts.duration,
                "rounds": opts.rounds,
                "upstream": opts.upstream,
                "client": client,
                "client_note": note,
                # per pod count: runs, proxy (medians), ratios, idle_cores, decision_live
                "per_pods": {str(r["pods"]): r for r in per_pods},
                # the first pod count's results at the top level too (what single-count readers expect)
                "runs": first["runs"],
                "proxy": first["proxy"],
                "ratios": first["ratios"],
                "idle_cores": first["idle_cores"],
                "decision": decisions,
            },
            f,
            indent=2,
        )
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The overhead flags (``extproc bench overhead`` can reuse them)."""
    p.add_argument("--pods", default="8", help="pods behind Envoy: a count or a comma list (8,64,512), one proxy comparison each")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (wrk rounds it to whole seconds)")
    p.add_argument("--connections", default="1,16", help="closed-loop connection counts")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (order rotated each round)")
    p.add_argument("--upstream", choices=["fake", "sim"], default="fake", help="fake: Envoy direct_response pods; sim: Python simulator")
    p.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto", help="load generator (auto: wrk if installed)")
    p.add_argument("--observe", default=",".join(OBSERVE_MODES), help="extproc --response-observe modes to compare")
    p.add_argument("--decision-pods", default="8,32,128,512", help="pod counts for in-process decision latency")
    p.add_argument("--variants", default="", help=f"extra scheduler variants to compare: {','.join(VARIANTS)}")
    p.add_argument("--out", default="bench-out", help="output directory (overhead.json)")


def options_from_args(a: argparse.Namespace) -> OverheadOptions:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x.strip()]

    return OverheadOptions(
        pods=parse_pods(a.pods),
        duration=a.duration,
        connections=ints(a.connections),
        rounds=getattr(a, "rounds", 2),
        upstream=getattr(a, "upstream", "fake"),
        client=getattr(a, "client", "auto"),
        observe=[m for m in getattr(a, "observe", ",".join(OBSERVE_MODES)).split(",") if m],
        decision_pods=ints(a.decision_pods),
        out_dir=a.out,
        variants=[v for v in getattr(a, "variants", "").split(",") if v],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extproc.bench.overhead", description=__doc__.splitlines()[0])
    add_arguments(p)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(options_from_args(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
