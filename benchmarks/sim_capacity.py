"""How much load one simulator process sustains: N pods in a child process (uvloop, one core's worth of work),
a closed-loop aiohttp client streaming completions from a SEPARATE process. Prints pods, streamed req/s and
the simulator's CPU seconds per request. Numbers only, no assertions.

    .venv/bin/python benchmarks/sim_capacity.py --pods 16 --concurrency 64 --duration 15 --max-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import aiohttp


async def _client(endpoints: list[str], concurrency: int, duration: float, max_tokens: int) -> tuple[int, int]:
    done = 0
    errors = 0
    deadline = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker(i: int) -> None:
            nonlocal done, errors
            k = i
            while time.monotonic() < deadline:
                ep = endpoints[k % len(endpoints)]
                k += 1
                body = {"model": "sim-llama", "prompt": f"request {k % 50} shared prefix of some length",
                        "max_tokens": max_tokens, "stream": True}
                try:
                    async with s.post(f"http://{ep}/v1/completions", json=body) as r:
                        raw = await r.read()
                        if r.status == 200 and raw.endswith(b"data: [DONE]\n\n"):
                            done += 1
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done, errors


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pods", type=int, default=16)
    ap.add_argument("--profile", default="llama3-8b-h100")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    args = ap.parse_args()
    sim = subprocess.Popen(
        [sys.executable, "-m", "extproc", "sim", "--pods", str(args.pods), "--profile", args.profile,
         "--time-scale", str(args.time_scale)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert sim.stdout is not None
        endpoints = json.loads(sim.stdout.readline())["endpoints"]
        import uvloop

        cpu0 = _cpu_seconds(sim.pid)
        t0 = time.monotonic()
        done, errors = uvloop.run(_client(endpoints, args.concurrency, args.duration, args.max_tokens))
        wall = time.monotonic() - t0
        cpu = _cpu_seconds(sim.pid) - cpu0
    finally:
        sim.terminate()
        sim.wait(timeout=15)
    rps = done / wall
    print(f"pods={args.pods} profile={args.profile} time_scale={args.time_scale} concurrency={args.concurrency} "
          f"max_tokens={args.max_tokens}")
    print(f"streamed req/s={rps:.0f} tokens/s={rps * args.max_tokens:.0f} errors={errors} "
          f"sim CPU util={cpu / wall:.2f} cores sim CPU ms/request={1000 * cpu / max(done, 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
