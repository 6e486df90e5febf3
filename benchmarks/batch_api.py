"""A batch job (the OpenAI Batch API, ``extproc batch serve``) beside interactive traffic on one fleet.

Goal (issue 15): interactive TTFT p90 with a running batch job ≤ 1.10× interactive-only, while the batch job
uses ≥ 70 % of the fleet's spare capacity.

Real time, through real Envoy + ``extproc serve`` (subprocess, the ``batch-interactive`` objectives and flow
control) + ``extproc batch serve`` (subprocess, behind Envoy, every line sent back through Envoy) + a simulated
fleet (``extproc sim``, its own process).

    .venv/bin/python benchmarks/batch_api.py [--rate 6] [--seconds 10] [--rounds 2] [--json out.json]

Definitions (each request shape measured in its own unit; batch lines are decode-heavy, like evaluations and
dataset labelling, interactive requests prompt-heavy chat turns):

* capacity of a shape, C_i (interactive shape) and C_b (batch shape): requests/s the fleet completes when every
  engine slot is busy — a closed loop of ``pods × max_num_seqs`` clients sending that shape back to back
  (priority 0, through the gateway) for ``--capacity-seconds`` after a warm-up;
* interactive load I: requests/s completed in the interactive-only runs; it uses the fraction I / C_i of the fleet;
* spare capacity, in batch lines/s: S = C_b × (1 − I / C_i);
* batch use B: lines/s the batch job completed during the interactive arrival window of the mixed runs (the
  job's ``request_counts`` read at the window's start and end);
* utilisation of the spare = B / S.

Each round runs interactive-only and mixed (order alternating between rounds) on the same stack; a mixed run
creates a job larger than the window can finish, lets the dispatcher ramp for ``--ramp`` seconds, replays the
SAME interactive trace (fixed seed), then cancels the job and lets the fleet drain.

The thresholds of ``batch-interactive`` are per-pod slot counts: the benchmark renders the profile for its
engine size (``--max-seqs``) with ``--headroom`` slots per pod kept for interactive requests (batch is shed at
``max_seqs − headroom`` requests in flight on a pod; interactive queues only when every slot is taken).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from extproc.bench.report import percentile
from extproc.bench.workloads import MODEL

_spec = importlib.util.spec_from_file_location("batch_interactive", Path(__file__).with_name("batch_interactive.py"))
assert _spec and _spec.loader
bi = importlib.util.module_from_spec(_spec)
sys.modules["batch_interactive"] = bi
_spec.loader.exec_module(bi)


def render_config(max_seqs: int, headroom: int, staleness_s: float, out: Path) -> Path:
    from importlib import resources

    cfg = yaml.safe_load((resources.files("extproc") / "configs" / "batch-interactive.yaml").read_text())
    batch_slots = max(1, max_seqs - headroom)
    for p in cfg["plugins"]:
        if p["type"] == "inflight-limit-filter":
            p["parameters"]["maxInflight"] = batch_slots
    cfg["saturationDetector"]["maxInflightPerPod"] = batch_slots
    cfg["flowControl"]["saturationDetector"]["maxInflightPerPod"] = max_seqs
    for d in (cfg["saturationDetector"], cfg["flowControl"]["saturationDetector"]):
        d["metricsStalenessThresholdSeconds"] = staleness_s
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def batch_file(n: int, seed: int, prompt_tokens: int, output_tokens: int) -> bytes:
    from extproc.bench.workloads import text

    rng = random.Random(f"batch-lines-{seed}")
    lines = []
    for i in range(n):
        body = {"model": MODEL, "prompt": text(rng, prompt_tokens), "max_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True}
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def capacity(url: str, reqs: Sequence[Any], clients: int, seconds: float, warmup_s: float) -> float:
    """Closed loop of ``clients`` senders (no objective: priority 0): completed requests/s after the warm-up."""
    done_at: list[float] = []
    stop = time.perf_counter() + warmup_s + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                r = reqs[i % len(reqs)]
                i += clients
                async with s.post(url + r.path, data=r.body_bytes(stream=False), headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done_at.append(time.perf_counter())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
    lo = t0 + warmup_s
    n = sum(1 for t in done_at if lo <= t < lo + seconds)
    return n / seconds


async def batch_get(s: aiohttp.ClientSession, url: str, bid: str) -> dict[str, Any]:
    async with s.get(f"{url}/v1/batches/{bid}") as r:
        return dict(await r.json())


async def mixed_run(url: str, rnd: int, interactive: Sequence[Any], args: argparse.Namespace, lines: int) -> tuple[Any, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", batch_file(lines, args.seed + rnd, args.batch_prompt_tokens, args.batch_output_tokens), filename="bench.jsonl")
        async with s.post(url + "/v1/files", data=form) as r:
            fid = (await r.json())["id"]
        async with s.post(url + "/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions", "completion_window": "1h"}) as r:
            bid = (await r.json())["id"]
        while (await batch_get(s, url, bid))["status"] == "validating":
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.ramp)  # AIMD ramps up to what the gateway admits
        c0 = (await batch_get(s, url, bid))["request_counts"]
        t0 = time.perf_counter()
        snap: dict[str, Any] = {}

        async def at_window_end() -> None:
            await asyncio.sleep(args.seconds)
            snap["counts"] = (await batch_get(s, url, bid))["request_counts"]
            snap["t"] = time.perf_counter() - t0

        end_task = asyncio.create_task(at_window_end())
        res = await bi.one_run(url, "mixed", rnd, interactive, [], args)
        await end_task
        c1 = snap["counts"]
        async with s.post(f"{url}/v1/batches/{bid}/cancel") as r:
            await r.read()
        while (await batch_get(s, url, bid))["status"] not in ("cancelled", "completed", "failed", "expired"):
            await asyncio.sleep(0.1)
    done = (c1["completed"] - c0["completed"])
    failed = (c1["failed"] - c0["failed"])
    if c1["completed"] + c1["failed"] >= c1["total"]:
        raise RuntimeError("the batch job finished inside the window: make it larger (--lines-factor)")
    return res, {"batch_id": bid, "lines_done": done, "lines_failed": failed, "window_s": snap["t"], "lines_per_s": done / snap["t"]}


async def main(args: argparse.Namespace) -> int:
    from extproc.harness import BatchServerProcess, Stack, StackSpec, start_sim_process, stop_process
    from extproc.netutil import free_port
    from extproc.sim.profiles import get_profile

    wd = Path(tempfile.mkdtemp(prefix="batch-api-bench-"))
    prof = get_profile("llama3-8b-h100").replace(name=f"llama3-8b-h100-seqs{args.max_seqs}", max_num_seqs=args.max_seqs)
    prof.to_yaml(wd / "profile.yaml")
    config = render_config(args.max_seqs, args.headroom, args.staleness, wd / "batch-interactive.yaml")
    interactive = bi.make_trace("interactive", args.rate, args.seconds, args.seed, args.prompt_tokens, args.output_tokens)
    cap_i_reqs = bi.make_trace("capacity", 50.0, 20.0, args.seed, args.prompt_tokens, args.output_tokens, start_index=2_000_000)
    cap_b_reqs = bi.make_trace("capacity-b", 50.0, 20.0, args.seed, args.batch_prompt_tokens, args.batch_output_tokens, start_index=3_000_000)
    sim, ready = await start_sim_process(["--pods", str(args.pods), "--profile", str(wd / "profile.yaml"), "--model", MODEL, "--time-scale", str(args.time_scale), "--seed", str(args.seed)])
    bport = free_port()
    runs: list[Any] = []
    batch_windows: list[dict[str, Any]] = []
    batch_metrics: dict[str, float] = {}
    try:
        async with Stack(StackSpec(endpoints=ready["endpoints"], config=str(config), models=[MODEL], scrape_interval_s=args.scrape_interval, envoy_args={"batch": f"127.0.0.1:{bport}"})) as st:
            bs = await BatchServerProcess.start(st.url, str(wd / "store"), port=bport, args=[
                "--max-concurrency", str(args.batch_max_concurrency), "--decrease-factor", str(args.decrease_factor),
                "--backoff", str(args.backoff), "--backoff-cap", str(args.backoff_cap)])  # fmt: skip
            try:
                await bi.one_run(st.url, "warmup", -1, interactive[: max(1, len(interactive) // 3)], [], args)
                cap_i = await capacity(st.url, cap_i_reqs, args.pods * args.max_seqs, args.capacity_seconds, args.capacity_warmup)
                await asyncio.sleep(args.settle)
                cap = await capacity(st.url, cap_b_reqs, args.pods * args.max_seqs, args.capacity_seconds, args.capacity_warmup)
                print(f"capacity: interactive shape {cap_i:.2f} req/s, batch shape {cap:.2f} req/s ({args.pods} pods × {args.max_seqs} slots, closed loop)", file=sys.stderr, flush=True)
                await asyncio.sleep(args.settle)
                lines = int(cap * (args.seconds + args.ramp) * args.lines_factor) + 100
                for rnd in range(args.rounds):
                    order = ("interactive-only", "mixed") if rnd % 2 == 0 else ("mixed", "interactive-only")
                    for kind in order:
                        if kind == "mixed":
                            res, bw = await mixed_run(st.url, rnd, interactive, args, lines)
                            batch_windows.append(bw)
                        else:
                            res = await bi.one_run(st.url, kind, rnd, interactive, [], args)
                        runs.append(res)
                        p90 = percentile([x.ttft_ms for x in res.interactive if x.ok], 90)
                        extra = f"  batch {batch_windows[-1]['lines_per_s']:.2f} lines/s" if kind == "mixed" else ""
                        print(f"round {rnd} {kind:16s} interactive TTFT p90 {p90:7.1f} ms{extra}", file=sys.stderr, flush=True)
                        await asyncio.sleep(args.settle)
                async with aiohttp.ClientSession() as ms, ms.get(bs.url + "/metrics") as r:
                    batch_metrics = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in (await r.text()).splitlines() if ln.startswith("extproc_batch_dispatch")}
            finally:
                await bs.stop()
    finally:
        await stop_process(sim)

    only = bi.summarize(runs, "interactive-only")
    mixed = bi.summarize(runs, "mixed")
    only_runs = [r for r in runs if r.kind == "interactive-only"]
    inter_rate = sum(sum(1 for x in r.interactive if x.ok) for r in only_runs) / (args.seconds * len(only_runs))
    spare = cap * (1.0 - inter_rate / cap_i)
    b_rate = sum(w["lines_done"] for w in batch_windows) / sum(w["window_s"] for w in batch_windows)
    util = b_rate / spare if spare > 0 else float("nan")
    ratio = mixed["ttft_p90_ms"] / only["ttft_p90_ms"] if only["ttft_p90_ms"] else float("nan")
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "capacity_interactive_shape_req_s": cap_i, "capacity_batch_shape_req_s": cap, "interactive_req_s": inter_rate,
        "interactive_fleet_share": inter_rate / cap_i, "spare_req_s": spare, "batch_lines_s": b_rate,
        "spare_used": util, "ttft_p90_ratio": ratio, "interactive_only": only, "mixed": mixed, "batch_windows": batch_windows,
        "batch_dispatch_metrics": batch_metrics,
    }  # fmt: skip
    print()
    print(f"fleet: {args.pods} pods llama3-8b-h100 max_num_seqs={args.max_seqs}, time-scale {args.time_scale}; batch-interactive, headroom {args.headroom} slots/pod")
    print(f"interactive {inter_rate:.2f} req/s of a capacity of {cap_i:.2f} (shape {args.prompt_tokens}→{args.output_tokens} tokens) = {inter_rate / cap_i * 100:.1f} % of the fleet")
    print(f"batch shape {args.batch_prompt_tokens}→{args.batch_output_tokens} tokens: capacity {cap:.2f} lines/s → spare {spare:.2f} lines/s; batch used {b_rate:.2f} lines/s = {util * 100:.1f} % of the spare")
    print()
    print("| run | interactive ok/sent | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | batch lines/s |")
    print("|---|---|---|---|---|---|")
    for name, s in (("interactive-only", only), ("mixed (batch job running)", mixed)):
        bl = f"{b_rate:.2f}" if s is mixed else "–"
        print(f"| {name} | {s['interactive_ok']}/{s['interactive_sent']} | {s['ttft_p50_ms']:.1f} | {s['ttft_p90_ms']:.1f} | {s['ttft_p99_ms']:.1f} | {bl} |")
    print()
    errors = mixed["interactive_errors"] or only["interactive_errors"]
    met = ratio <= 1.10 and util >= 0.70 and not errors and sum(w["lines_failed"] for w in batch_windows) == 0
    print(f"batch dispatcher: {batch_metrics}")
    print(f"TTFT p90 ratio {ratio:.3f} (goal ≤ 1.10), spare used {util * 100:.1f} % (goal ≥ 70 %): {'met' if met else 'NOT met'}")
    if errors:
        print(f"interactive errors: only={only['interactive_errors']} mixed={mixed['interactive_errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--max-seqs", type=int, default=16, help="engine max_num_seqs of every simulated pod")
    p.add_argument("--headroom", type=int, default=2, help="slots per pod kept for interactive requests")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--scrape-interval", type=float, default=0.05)
    p.add_argument("--rate", type=float, default=6.0, help="interactive requests/s")
    p.add_argument("--seconds", type=float, default=10.0, help="arrival window of one run")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--capacity-warmup", type=float, default=3.0)
    p.add_argument("--staleness", type=float, default=1.0, help="metricsStalenessThresholdSeconds of the rendered config (a loaded machine scrapes late)")
    p.add_argument("--ramp", type=float, default=4.0, help="seconds the batch job runs before the window starts")
    p.add_argument("--lines-factor", type=float, default=1.5, help="job size = capacity × (window + ramp) × this")
    p.add_argument("--drain", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--batch-prompt-tokens", type=int, default=64)
    p.add_argument("--batch-output-tokens", type=int, default=64)
    p.add_argument("--batch-max-concurrency", type=int, default=100)
    p.add_argument("--decrease-factor", type=float, default=0.5)
    p.add_argument("--backoff", type=float, default=0.1)
    p.add_argument("--backoff-cap", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(parse_args())))
