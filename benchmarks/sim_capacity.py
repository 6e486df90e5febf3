"""How much load one simulator process sustains: N pods in one child process (uvloop), driven by closed-loop
aiohttp clients streaming completions from SEPARATE processes (``--clients``; their results are summed, so the
load generator is not the bottleneck). With ``taskset`` available the simulator is pinned to one core
(``--sim-cpu``, default 0) and the clients to the others (``--client-cpus``, default: every other core), so
"one simulator core" is what is measured. Prints pods, streamed req/s and the simulator's CPU seconds per
request (utime + stime of the simulator process, all threads). Numbers only, no assertions.

    .venv/bin/python benchmarks/sim_capacity.py --pods 16 --clients 3 --concurrency 64 --duration 15 --max-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import aiohttp


async def _client(endpoints: list[str], concurrency: int, start_at: float, duration: float, max_tokens: int,
                  seed: int) -> tuple[int, int, int]:
    """Closed loop until ``start_at + duration`` (CLOCK_MONOTONIC is system-wide); counts only requests that
    finish inside the window. Returns (streams completed, tokens streamed, errors)."""
    done = 0
    tokens = 0
    errors = 0
    deadline = start_at + duration
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

        async def worker(i: int) -> None:
            nonlocal done, tokens, errors
            k = i + seed * 7919
            while time.monotonic() < deadline:
                ep = endpoints[k % len(endpoints)]
                k += 1
                body = {"model": "sim-llama", "prompt": f"request {k % 50} shared prefix of some length",
                        "max_tokens": max_tokens, "stream": True}
                try:
                    async with s.post(f"http://{ep}/v1/completions", json=body) as r:
                        raw = await r.read()
                        if time.monotonic() > deadline:
                            return
                        if r.status == 200 and raw.endswith(b"data: [DONE]\n\n"):
                            done += 1
                            tokens += raw.count(b"data: {")
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done, tokens, errors


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def _worker_main(args: argparse.Namespace) -> int:
    import uvloop

    endpoints = args.endpoints.split(",")
    done, tokens, errors = uvloop.run(
        _client(endpoints, args.concurrency, args.start_at, args.duration, args.max_tokens, args.seed))
    print(json.dumps({"done": done, "tokens": tokens, "errors": errors}), flush=True)
    return 0


def _pin(cpus: str | None) -> list[str]:
    if cpus is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpus]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=16)
    ap.add_argument("--profile", default="llama3-8b-h100")
    ap.add_argument("--clients", type=int, default=1, help="client processes (results summed)")
    ap.add_argument("--concurrency", type=int, default=64, help="in-flight streams per client process")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds between client start-up and the window")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--sim-cpu", default="0", help="taskset CPU list for the simulator ('' = no pinning)")
    ap.add_argument("--client-cpus", default=None, help="taskset CPU list for the clients (default: all but --sim-cpu)")
    # internal: one client process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoints", default="", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker_main(args)

    ncpu = os.cpu_count() or 1
    sim_cpu = args.sim_cpu or None
    client_cpus = args.client_cpus
    if client_cpus is None and sim_cpu is not None and ncpu > 1:
        pinned = {int(c) for c in sim_cpu.split(",") if c.strip().isdigit()}
        rest = [str(c) for c in sorted(os.sched_getaffinity(0)) if c not in pinned]
        client_cpus = ",".join(rest) or None
    sim = subprocess.Popen(
        [*_pin(sim_cpu), sys.executable, "-m", "extproc", "sim", "--pods", str(args.pods), "--profile", args.profile,
         "--time-scale", str(args.time_scale), "--base-port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert sim.stdout is not None
        endpoints = json.loads(sim.stdout.readline())["endpoints"]
        start_at = time.monotonic() + args.warmup
        for i in range(args.clients):
            clients.append(subprocess.Popen(
                [*_pin(client_cpus), sys.executable, os.path.abspath(__file__), "--worker",
                 "--endpoints", ",".join(endpoints), "--concurrency", str(args.concurrency),
                 "--start-at", repr(start_at), "--duration", str(args.duration),
                 "--max-tokens", str(args.max_tokens), "--seed", str(i)],
                stdout=subprocess.PIPE, text=True,
            ))
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = _cpu_seconds(sim.pid)
        t0 = time.monotonic()
        time.sleep(max(0.0, start_at + args.duration - time.monotonic()))
        cpu = _cpu_seconds(sim.pid) - cpu0
        wall = time.monotonic() - t0
        done = tokens = errors = 0
        for c in clients:
            out, _ = c.communicate(timeout=120)
            r = json.loads(out.strip().splitlines()[-1])
            done += r["done"]
            tokens += r["tokens"]
            errors += r["errors"]
    finally:
        for c in clients:
            if c.poll() is None:
                c.terminate()
                c.wait(timeout=15)
        sim.terminate()
        sim.wait(timeout=15)
    rps = done / wall
    print(f"pods={args.pods} profile={args.profile} time_scale={args.time_scale} clients={args.clients} "
          f"concurrency/client={args.concurrency} max_tokens={args.max_tokens} "
          f"sim_cpu={sim_cpu if _pin(sim_cpu) else 'unpinned'} client_cpus={client_cpus if _pin(client_cpus) else 'unpinned'}")
    print(f"streamed req/s={rps:.0f} SSE chunks/s={tokens / wall:.0f} errors={errors} "
          f"sim CPU util={cpu / wall:.2f} cores sim CPU ms/request={1000 * cpu / max(done, 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
