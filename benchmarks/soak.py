"""Soak: steady load through real Envoy + ``extproc serve`` (subprocess) + a simulated fleet (its own process),
with a fault injected every ``--fault-every`` seconds. Prints a summary table and writes JSON.

    .venv/bin/python benchmarks/soak.py --minutes 10 --rate 20 [--pods 4] [--json soak.json] [--plot soak.png]
        [--lru-capacity N]   # the prefix index's per-pod bound (lruCapacityPerServer) in a copy of --config

Faults, in rotation (each lasts ``--fault-every`` / 2 seconds, then is cleared): kill a pod and restart it,
slow a pod 4×, fail a pod's /metrics, hang a pod and release it, cut a pod's next stream, 20 % 500s on a pod.

Measured: scheduler RSS over time (/proc/PID/status VmRSS), in-flight counts at the end (scheduler /metrics
``extproc_pod_inflight_requests``), prefix index size (``extproc_prefix_index_blocks``), and requests lost:
sent − (answers received: success, an HTTP error status, or a stream cut by a killed pod). A request that gets
no answer within ``--request-timeout`` seconds, or a transport error before any status, is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL = "sim-llama"
FAULTS = ("kill", "slow", "metrics_fail", "hang", "die_mid_stream", "errors")


# --------------------------------------------------------------------------------------------- fleet child process
async def _fleet_child(args: argparse.Namespace) -> int:
    """The simulated fleet in its own process; JSON commands on stdin, one JSON answer per line on stdout."""
    from extproc.sim.fleet import FleetSpec, SimFleet

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with SimFleet(FleetSpec(pods=args.pods, profile=args.profile, model=MODEL, time_scale=args.time_scale, seed=args.seed)) as fleet:
        print(json.dumps({"endpoints": fleet.endpoints}), flush=True)
        while True:
            line = await reader.readline()
            if not line:
                return 0
            cmd = json.loads(line)
            pod = fleet.pods[int(cmd.get("pod", 0))]
            op = cmd["op"]
            try:
                if op == "kill":
                    await pod.kill()
                elif op == "restart":
                    await pod.restart()
                elif op == "revive":  # restart only if dead
                    if not pod.alive:
                        await pod.restart()
                elif op == "faults":
                    pod.set_faults(**cmd.get("faults", {}))
                elif op == "quit":
                    print(json.dumps({"ok": True}), flush=True)
                    return 0
                print(json.dumps({"ok": True}), flush=True)
            except Exception as e:  # report, keep serving
                print(json.dumps({"ok": False, "error": repr(e)}), flush=True)


class FleetProcess:
    def __init__(self, proc: asyncio.subprocess.Process, endpoints: list[str]) -> None:
        self.proc = proc
        self.endpoints = endpoints
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, pods: int, profile: str, time_scale: float, seed: int) -> "FleetProcess":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--fleet-child", "--pods", str(pods), "--profile", profile, "--time-scale", str(time_scale), "--seed", str(seed),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            await proc.wait()
            raise RuntimeError("the fleet process exited before it was ready")
        return cls(proc, json.loads(line)["endpoints"])

    async def command(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            await self.proc.stdin.drain()
            return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))  # type: ignore[no-any-return]

    async def stop(self) -> None:
        from extproc.harness import stop_process

        with contextlib.suppress(Exception):
            await self.command(op="quit")
        await stop_process(self.proc)


# --------------------------------------------------------------------------------------------- measurements
def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)", re.M)


async def scrape(session: Any, url: str) -> dict[str, list[tuple[str, float]]]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, list[tuple[str, float]]] = {}
    for m in _SAMPLE_RE.finditer(text):
        out.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return out


@dataclass(slots=True)
class Sample:
    t_s: float
    rss_mib: float
    inflight: float
    prefix_blocks: float
    sent: int
    answered: int


@dataclass(slots=True)
class Tally:
    sent: int = 0
    ok: int = 0
    truncated: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    lost_reasons: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.ok + self.truncated + sum(v for k, v in self.statuses.items() if k != 200)


async def one_request(session: Any, url: str, i: int, tally: Tally, timeout_s: float, rng: random.Random) -> None:
    import aiohttp

    stream = rng.random() < 0.5
    group = rng.randrange(16)
    body = {
        "model": MODEL,
        "prompt": f"system prompt {group}: " + "you are a careful assistant. " * 12 + f"user question {i} {rng.random()}",
        "max_tokens": rng.choice((4, 8, 16, 32)),
        "stream": stream,
    }
    headers = {"x-gateway-inference-priority": "-1"} if rng.random() < 0.2 else {}
    tally.sent += 1
    t0 = time.perf_counter()
    status = 0
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                status = r.status
                try:
                    data = await r.read()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                    tally.truncated += 1  # a pod killed mid-stream: the documented outcome
                    return
        if status == 200:
            if stream and b"[DONE]" not in data:
                tally.truncated += 1
            else:
                tally.ok += 1
                tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
        else:
            tally.statuses[status] += 1
    except (TimeoutError, asyncio.TimeoutError):
        tally.lost += 1
        tally.lost_reasons["timeout"] += 1
    except aiohttp.ClientError as e:
        if status:
            tally.truncated += 1
        else:
            tally.lost += 1
            tally.lost_reasons[type(e).__name__] += 1


async def inject(fleet: FleetProcess, kind: str, pod: int, hold_s: float, log: list[dict[str, Any]], t0: float) -> None:
    log.append({"t_s": round(time.monotonic() - t0, 1), "fault": kind, "pod": pod})
    if kind == "kill":
        await fleet.command(op="kill", pod=pod)
        await asyncio.sleep(hold_s)
        await fleet.command(op="restart", pod=pod)
        return
    faults: dict[str, Any] = {
        "slow": {"slow_factor": 4.0},
        "metrics_fail": {"metrics_fail": True},
        "hang": {"hang": True},
        "die_mid_stream": {"die_mid_stream": True},
        "errors": {"error_rate": 0.2},
    }[kind]
    await fleet.command(op="faults", pod=pod, faults=faults)
    await asyncio.sleep(hold_s)
    await fleet.command(op="faults", pod=pod, faults={})


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from extproc.harness import Stack, StackSpec

    duration = args.seconds if args.seconds else args.minutes * 60.0
    rng = random.Random(args.seed)
    config = args.config
    if args.lru_capacity:
        config = _config_with_lru_capacity(args.config, args.lru_capacity)
    fleet = await FleetProcess.start(args.pods, args.profile, args.time_scale, args.seed)
    tally = Tally()
    samples: list[Sample] = []
    faults_log: list[dict[str, Any]] = []
    try:
        spec = StackSpec(endpoints=fleet.endpoints, config=config, models=[MODEL], failure_mode=args.failure_mode)
        async with Stack(spec) as st, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            assert st.scheduler is not None and st.metrics_url is not None
            pid = st.scheduler.proc.pid
            t0 = time.monotonic()
            tasks: set[asyncio.Task[None]] = set()

            async def sampler() -> None:
                while True:
                    m = await scrape(s, st.metrics_url)  # type: ignore[arg-type]
                    samples.append(
                        Sample(
                            round(time.monotonic() - t0, 1), rss_mib(pid),
                            sum(v for _, v in m.get("extproc_pod_inflight_requests", [])),
                            sum(v for _, v in m.get("extproc_prefix_index_blocks", [])),
                            tally.sent, tally.answered + tally.lost,
                        )
                    )  # fmt: skip
                    await asyncio.sleep(args.sample_every)

            async def faulter() -> None:
                k = 0
                while True:  # fault k starts at (k + 1) × fault_every, whatever the previous one took
                    await asyncio.sleep(max(0.0, t0 + (k + 1) * args.fault_every - time.monotonic()))
                    await inject(fleet, FAULTS[k % len(FAULTS)], k % args.pods, args.fault_every / 2, faults_log, t0)
                    k += 1

            bg = [asyncio.create_task(sampler()), asyncio.create_task(faulter())]
            i = 0
            next_t = t0
            while True:
                next_t += rng.expovariate(args.rate)
                now = time.monotonic()
                if next_t - t0 >= duration:
                    break
                if next_t > now:
                    await asyncio.sleep(next_t - now)
                i += 1
                t = asyncio.create_task(one_request(s, st.url, i, tally, args.request_timeout, rng))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            bg[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bg[1]
            for p in range(args.pods):  # clear every fault and bring every pod back before the final checks
                await fleet.command(op="faults", pod=p, faults={})
                await fleet.command(op="revive", pod=p)
            if tasks:
                await asyncio.wait(tasks, timeout=args.request_timeout + 10)
            # in-flight accounting must return to 0 once every answer is in
            deadline = time.monotonic() + 30
            final: dict[str, list[tuple[str, float]]] = {}
            while time.monotonic() < deadline:
                final = await scrape(s, st.metrics_url)
                if all(v == 0 for _, v in final.get("extproc_pod_inflight_requests", [])):
                    break
                await asyncio.sleep(0.2)
            bg[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bg[0]
            end_rss = rss_mib(pid)
            end_inflight = {lbl: v for lbl, v in final.get("extproc_pod_inflight_requests", [])}
            prefix_blocks = sum(v for _, v in final.get("extproc_prefix_index_blocks", []))
    finally:
        await fleet.stop()

    warm = [x for x in samples if x.t_s >= min(args.warmup, duration / 3)]
    rss_warm = warm[0].rss_mib if warm else (samples[0].rss_mib if samples else end_rss)
    rss_max = max([x.rss_mib for x in warm] + [end_rss])
    rss_min = min([x.rss_mib for x in warm] + [end_rss])
    lat = sorted(tally.latencies_ms)
    result = {
        "command": " ".join(sys.argv),
        "duration_s": duration,
        "rate_rps": args.rate,
        "pods": args.pods,
        "config": args.config,
        "lru_capacity_per_server": args.lru_capacity or None,
        "warmup_s": min(args.warmup, duration / 3),
        "sent": tally.sent,
        "ok": tally.ok,
        "http_errors": {str(k): v for k, v in sorted(tally.statuses.items())},
        "truncated_streams": tally.truncated,
        "lost": tally.sent - tally.answered,
        "lost_reasons": dict(tally.lost_reasons),
        "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
        "latency_ms_p99": round(lat[int(len(lat) * 0.99) - 1], 1) if len(lat) >= 100 else None,
        "rss_mib_after_warmup": round(rss_warm, 1),
        "rss_mib_end": round(end_rss, 1),
        "rss_mib_max_after_warmup": round(rss_max, 1),
        "rss_growth_pct": round((end_rss - rss_warm) / rss_warm * 100, 1) if rss_warm else None,
        # the widest band RSS moved in after warm-up, relative to the warm-up value
        "rss_band_pct_after_warmup": round((rss_max - rss_min) / rss_warm * 100, 1) if rss_warm else None,
        "inflight_end": end_inflight,
        "inflight_end_total": sum(end_inflight.values()),
        "prefix_index_blocks_end": prefix_blocks,
        "prefix_index_blocks_max": max((x.prefix_blocks for x in samples), default=0.0),
        "faults": faults_log,
        "samples": [asdict(x) for x in samples],
    }
    return result


def _config_with_lru_capacity(config: str, capacity: int) -> str:
    """A copy of ``config`` (a shipped name or a path) whose prefix-cache-scorer has ``lruCapacityPerServer``."""
    import tempfile

    import yaml

    src = Path(config)
    if not src.exists():
        src = Path(__file__).resolve().parent.parent / "extproc" / "configs" / f"{config}.yaml"
    doc = yaml.safe_load(src.read_text())
    found = False
    for plugin in doc.get("plugins", []):
        if plugin.get("type") == "prefix-cache-scorer":
            plugin.setdefault("parameters", {})["lruCapacityPerServer"] = capacity
            found = True
    if not found:
        raise SystemExit(f"--lru-capacity: {config} has no prefix-cache-scorer")
    fd, path = tempfile.mkstemp(prefix="soak-config-", suffix=".yaml")
    with open(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def plot(r: dict[str, Any], out: str) -> None:
    """RSS and prefix index size over time, with the warm-up and the ±5 % band around the warm-up RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x["t_s"] / 60 for x in r["samples"]]
    rss = [x["rss_mib"] for x in r["samples"]]
    blocks = [x["prefix_blocks"] for x in r["samples"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, rss, color="tab:blue", label="scheduler RSS (MiB)")
    warm = r["rss_mib_after_warmup"]
    ax.axvspan(0, r["warmup_s"] / 60, color="0.9", label="warm-up")
    ax.axhspan(warm * 0.95, warm * 1.05, color="tab:green", alpha=0.12, label="±5 % of the warm-up RSS")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, max(rss + [warm * 1.1]) * 1.1)
    ax2 = ax.twinx()
    ax2.plot(t, blocks, color="tab:orange", linestyle="--", label="prefix index blocks")
    ax2.set_ylabel("prefix index blocks")
    ax2.set_ylim(0, max(blocks + [1]) * 1.2)
    for f in r["faults"]:
        ax.axvline(f["t_s"] / 60, color="tab:red", alpha=0.25, linewidth=0.8)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(
        f"soak: {r['duration_s'] / 60:.0f} min, {r['rate_rps']} req/s, {r['sent']} sent, {r['lost']} lost, "
        f"RSS band after warm-up {r['rss_band_pct_after_warmup']} % (faults: red lines)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_summary(r: dict[str, Any]) -> None:
    rows = [
        ("duration", f"{r['duration_s']:.0f} s at {r['rate_rps']} req/s on {r['pods']} pods ({r['config']})"),
        ("sent / ok", f"{r['sent']} / {r['ok']}"),
        ("HTTP errors (answered)", json.dumps(r["http_errors"])),
        ("streams cut by a dying pod", str(r["truncated_streams"])),
        ("requests lost", f"{r['lost']} {json.dumps(r['lost_reasons']) if r['lost_reasons'] else ''}"),
        ("latency p50 / p99 ms", f"{r['latency_ms_p50']} / {r['latency_ms_p99']}"),
        ("faults injected", f"{len(r['faults'])}: {', '.join(sorted({f['fault'] for f in r['faults']}))}"),
        ("scheduler RSS MiB warm → end (max)", f"{r['rss_mib_after_warmup']} → {r['rss_mib_end']} ({r['rss_mib_max_after_warmup']}), {r['rss_growth_pct']} %"),
        ("RSS band after warm-up", f"{r['rss_band_pct_after_warmup']} % (warm-up {r['warmup_s']:.0f} s)"),
        ("in-flight at end", f"{r['inflight_end_total']:.0f} {json.dumps(r['inflight_end'])}"),
        ("prefix index blocks end / max", f"{r['prefix_index_blocks_end']:.0f} / {r['prefix_index_blocks_max']:.0f}"),
    ]
    w = max(len(k) for k, _ in rows)
    print("-" * (w + 60))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * (w + 60))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=0.0, help="overrides --minutes (short CI runs)")
    ap.add_argument("--rate", type=float, default=20.0, help="Poisson arrival rate, requests per second")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--profile", default="llama3-8b-h100")
    ap.add_argument("--time-scale", type=float, default=0.05, help="simulated durations × this (0.05: ~20× faster)")
    ap.add_argument("--config", default="default")
    ap.add_argument("--failure-mode", default="fail-close", choices=["fail-close", "fail-open"])
    ap.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--plot", default=None, help="write a PNG of RSS and prefix index size over time here")
    ap.add_argument("--lru-capacity", type=int, default=0, help="prefix index bound per pod (lruCapacityPerServer); 0 = the config's")
    ap.add_argument("--fleet-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fleet_child:
        import uvloop

        return uvloop.run(_fleet_child(args))
    import logging

    logging.basicConfig(level=logging.WARNING)
    r = asyncio.run(soak(args))
    print_summary(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    if args.plot:
        plot(r, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
