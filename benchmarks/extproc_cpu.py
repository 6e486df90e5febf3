"""CPU cost per request of one ``extproc serve`` process (and of Envoy) through real Envoy, plus req/s and p50.

For each setup (an Envoy-only round-robin stack, or Envoy + extproc in one ``--response-observe`` mode) and each
connection count, the script runs a closed-loop load (``extproc.bench.overhead.measure``: aiohttp client in its
own process, one keep-alive connection per worker) over simulated pods (time_scale 0.001, 1 output token) and
reads the scheduler's and Envoy's CPU seconds from ``/proc/PID/stat`` before and after. Idle CPU (scrape loop,
timers) is measured for a moment before the load and subtracted, so ``sched_us`` is the per-request cost of the
ext_proc streams themselves. Setups run interleaved for ``--rounds`` rounds (the machine is shared and noisy).

    .venv/bin/python benchmarks/extproc_cpu.py [--modes envoy,none,observability,streamed] [--connections 1,16]
        [--rounds 2] [--duration 4] [--pods 8] [--scheduler-arg=--flag ...] [--envoy-concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extproc.bench.overhead import measure  # noqa: E402
from extproc.harness import Stack, StackSpec, start_sim_process, stop_process  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _spec(mode: str, endpoints: list[str], args: argparse.Namespace) -> StackSpec:
    if mode == "envoy":
        return StackSpec(endpoints=endpoints, config=None, lb_policy="ROUND_ROBIN", envoy_concurrency=args.envoy_concurrency)
    return StackSpec(
        endpoints=endpoints,
        config="default",
        models=["sim-llama"],
        response_observe=mode,
        scheduler_args=list(args.scheduler_arg),
        envoy_concurrency=args.envoy_concurrency,
    )


async def _one(mode: str, endpoints: list[str], connections: int, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with Stack(_spec(mode, endpoints, args)) as st:
        assert st.envoy is not None
        pids = {"envoy": st.envoy.pid}
        if st.scheduler is not None:
            pids["sched"] = st.scheduler.proc.pid
        await asyncio.sleep(0.5)
        idle_s = 1.5
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        await asyncio.sleep(idle_s)
        idle = {k: (cpu_seconds(p) - c0[k]) / idle_s for k, p in pids.items()}
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = loop.time()
        m = await loop.run_in_executor(None, measure, st.url, connections, args.duration)
        wall = loop.time() - t0
        used = {k: cpu_seconds(p) - c0[k] for k, p in pids.items()}
    n = max(1, m["requests"])
    row: dict[str, Any] = {"mode": mode, "connections": connections, **m}
    for k in pids:
        row[f"{k}_us"] = round(max(0.0, used[k] - idle[k] * wall) / n * 1e6)
    return row


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc, info = await start_sim_process(["--pods", str(args.pods), "--base-port", "0", "--time-scale", "0.001"])
    rows: list[dict[str, Any]] = []
    try:
        eps = list(info["endpoints"])
        for rnd in range(args.rounds):
            for c in args.connections:
                for mode in args.modes:
                    r = await _one(mode, eps, c, args)
                    r["round"] = rnd
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        await stop_process(proc)
    return rows


def summarize(rows: list[dict[str, Any]]) -> None:
    print("| setup | connections | req/s | p50 ms | p99 ms | scheduler CPU µs/req | Envoy CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|")
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r["mode"], r["connections"]) not in keys:
            keys.append((r["mode"], r["connections"]))
    for mode, c in sorted(keys, key=lambda k: (k[1], keys.index(k))):
        rs = [r for r in rows if r["mode"] == mode and r["connections"] == c]

        def med(k: str) -> str:
            vals = [r[k] for r in rs if r.get(k) is not None]
            return str(round(statistics.median(vals), 2)) if vals else "-"

        name = "envoy-only (round robin)" if mode == "envoy" else f"envoy+extproc {mode}"
        print(
            f"| {name} | {c} | {med('rps')} | {med('p50_ms')} | {med('p99_ms')} | {med('sched_us')} | {med('envoy_us')} | "
            f"{sum(r['errors'] for r in rs)} |"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="envoy,none,observability,streamed", help="envoy (no ext_proc) and/or response-observe modes")
    p.add_argument("--connections", default="16", help="comma list of closed-loop connection counts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=4.0, help="seconds of load per run")
    p.add_argument("--pods", type=int, default=8)
    p.add_argument("--envoy-concurrency", type=int, default=1)
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra `extproc serve` argument (repeatable; use --scheduler-arg=--flag)")
    a = p.parse_args()
    a.modes = [m for m in a.modes.split(",") if m]
    a.connections = [int(c) for c in a.connections.split(",") if c]
    summarize(asyncio.run(main(a)))
