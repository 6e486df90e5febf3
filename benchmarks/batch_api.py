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
  (priority 0, through the gateway) for ``--capacity-seconds`` after a warm-up, rate by Little's law;
* interactive load I: requests/s completed in the round's interactive-only run; it uses the fraction I / C_i;
* spare capacity, in batch lines/s: S = C_b × (1 − I / C_i);
* batch use B: lines/s the batch job completed during the interactive arrival window of the mixed runs (the
  job's ``request_counts`` read at the window's start and end);
* utilisation of the spare = B / S.

Fresh processes (cold), one warm-up stage (a batch-shape capacity probe, then the whole interactive trace alone and
beside a job, so its prompts are cached where each kind of run sends them), then ``--rounds`` warm rounds. Each round measures the capacities
(Little's law: clients / mean latency of the closed loop), an interactive-only run and a mixed run on the same
stack, in an order mirrored between rounds, so box load affects both sides alike; every per-round value and
the medians are reported (the goal is judged on the medians), with pooled values beside them. A mixed run
creates a job larger than the window can finish, lets the dispatcher ramp for ``--ramp`` seconds, replays the
SAME interactive trace (fixed seed), then cancels the job and lets the fleet drain. Batch output lengths are
uniform in [mean/2, 3·mean/2] (see :func:`output_len`).

The thresholds of ``batch-interactive`` are per-pod slot counts: the benchmark renders the profile for its
engine size (``--max-seqs``) with ``--headroom`` slots per pod kept for interactive requests (batch is shed at
``max_seqs − headroom`` requests in flight on a pod; interactive queues only when every slot is taken).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from extproc.scheduling.reservation import DEFAULT_RESERVED_PODS
from extproc.bench.report import percentile
from extproc.bench.workloads import MODEL

_spec = importlib.util.spec_from_file_location("batch_interactive", Path(__file__).with_name("batch_interactive.py"))
assert _spec and _spec.loader
bi = importlib.util.module_from_spec(_spec)
sys.modules["batch_interactive"] = bi
_spec.loader.exec_module(bi)


def render_config(max_seqs: int, headroom: int, staleness_s: float, out: Path, reserved_pods: int | None = None) -> Path:
    """``reserved_pods``: the ``batch-reserve-filter``'s ``reservedPods`` (None: the config's, i.e. the default)."""
    from importlib import resources

    cfg = yaml.safe_load((resources.files("extproc") / "configs" / "batch-interactive.yaml").read_text())
    batch_slots = max(1, max_seqs - headroom)
    for p in cfg["plugins"]:
        if p["type"] == "inflight-limit-filter":
            p["parameters"]["maxInflight"] = batch_slots
        if p["type"] == "batch-reserve-filter" and reserved_pods is not None:
            p["parameters"] = {"reservedPods": reserved_pods}
    cfg["saturationDetector"]["maxInflightPerPod"] = batch_slots
    cfg["flowControl"]["saturationDetector"]["maxInflightPerPod"] = max_seqs
    for d in (cfg["saturationDetector"], cfg["flowControl"]["saturationDetector"]):
        d["metricsStalenessThresholdSeconds"] = staleness_s
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def output_len(rng: random.Random, mean: int) -> int:
    """Batch output lengths, uniform in [mean/2, 3·mean/2]: equal lengths kept the lines of a burst (a job's
    start, a closed loop's first requests) finishing in waves one line-duration apart, and a window of a few
    line durations then counted 2 or 3 waves: ±1 wave moved the measured rate by a third."""
    return rng.randint(max(1, mean // 2), mean + mean // 2)


def batch_file(n: int, seed: int, prompt_tokens: int, output_tokens: int) -> bytes:
    from extproc.bench.workloads import text

    rng = random.Random(f"batch-lines-{seed}")
    lines = []
    for i in range(n):
        body = {"model": MODEL, "prompt": text(rng, prompt_tokens), "max_tokens": output_len(rng, output_tokens), "temperature": 0.0, "ignore_eos": True}
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def capacity(url: str, reqs: Sequence[Any], clients: int, seconds: float, warmup_s: float) -> float:
    """Closed loop of ``clients`` senders (no objective: priority 0): requests/s the fleet completes with every
    engine slot busy, by Little's law: ``clients`` requests are always outstanding, so the rate is clients / the
    mean latency of the requests started after the warm-up. Counting completions in the window instead counted
    whole waves of requests that started together (± a third on a window of 2–3 line durations)."""
    lat: list[float] = []
    stop = time.perf_counter() + warmup_s + seconds
    lo = time.perf_counter() + warmup_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                r = reqs[i % len(reqs)]
                i += clients
                t = time.perf_counter()
                async with s.post(url + r.path, data=r.body_bytes(stream=False), headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status == 200 and t >= lo:
                        lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return clients / statistics.fmean(lat) if lat else 0.0


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


async def batch_dispatch_metrics(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("extproc_batch_dispatch")}


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def round_order(rnd: int) -> tuple[str, ...]:
    """Mirrored between rounds, so every stage sits as often early as late in a pair of rounds and box load
    drifting over the run hits each side alike; the capacity runs stay next to the interactive-only run."""
    return ("capacity", "interactive-only", "mixed") if rnd % 2 == 0 else ("mixed", "interactive-only", "capacity")


async def main(args: argparse.Namespace) -> int:
    from extproc.harness import BatchServerProcess, Stack, StackSpec, start_sim_process, stop_process
    from extproc.netutil import free_port
    from extproc.sim.profiles import get_profile

    wd = Path(tempfile.mkdtemp(prefix="batch-api-bench-"))
    prof = get_profile("llama3-8b-h100").replace(name=f"llama3-8b-h100-seqs{args.max_seqs}", max_num_seqs=args.max_seqs)
    prof.to_yaml(wd / "profile.yaml")
    config = render_config(args.max_seqs, args.headroom, args.staleness, wd / "batch-interactive.yaml", args.reserved_pods)
    reserved = yaml.safe_load(config.read_text())
    reserved_pods = next((int((p.get("parameters") or {}).get("reservedPods", DEFAULT_RESERVED_PODS)) for p in reserved["plugins"] if p["type"] == "batch-reserve-filter"), 0)
    interactive = bi.make_trace("interactive", args.rate, args.seconds, args.seed, args.prompt_tokens, args.output_tokens)
    cap_i_reqs = bi.make_trace("capacity", 50.0, 20.0, args.seed, args.prompt_tokens, args.output_tokens, start_index=2_000_000)
    cap_b_reqs = bi.make_trace("capacity-b", 50.0, 20.0, args.seed, args.batch_prompt_tokens, args.batch_output_tokens, start_index=3_000_000)
    len_rng = random.Random(f"capacity-b-lengths-{args.seed}")
    for r in cap_b_reqs:  # the batch shape: the same output-length distribution as the job's lines
        r.max_tokens = output_len(len_rng, args.batch_output_tokens)
    load_start = os.getloadavg()
    t_start = time.time()
    print(f"seeds: interactive trace {args.seed} (Poisson {args.rate}/s × {args.seconds}s = {len(interactive)} requests, the same every run), "
          f"batch file seed+round, sim {args.seed}; dispatcher {args.dispatcher}; load average {load_start[0]:.1f}", file=sys.stderr, flush=True)  # fmt: skip
    sim, ready = await start_sim_process(["--pods", str(args.pods), "--profile", str(wd / "profile.yaml"), "--model", MODEL, "--time-scale", str(args.time_scale), "--seed", str(args.seed)])
    bport = free_port()
    runs: list[Any] = []
    rounds: list[dict[str, Any]] = []
    batch_metrics: dict[str, float] = {}
    clients = args.pods * args.max_seqs
    bs_args = ["--max-concurrency", str(args.batch_max_concurrency), "--decrease-factor", str(args.decrease_factor),
               "--backoff", str(args.backoff), "--backoff-cap", str(args.backoff_cap)]  # fmt: skip
    if args.dispatcher == "aimd":
        bs_args.append("--no-gateway-headroom")
    try:
        async with Stack(StackSpec(endpoints=ready["endpoints"], config=str(config), models=[MODEL], scrape_interval_s=args.scrape_interval, envoy_args={"batch": f"127.0.0.1:{bport}"})) as st:
            bs = await BatchServerProcess.start(st.url, str(wd / "store"), port=bport, args=bs_args)
            try:
                # stage 0 (cold → warm): fresh processes; a batch-shape capacity probe (which also sizes the job),
                # then the whole interactive trace alone and once beside a job (seed 7 − 1, not measured), so that
                # every prompt of the trace is in the prefix cache of the pods it goes to in both kinds of run.
                # Before, the warm-up replayed a third of the trace: round 0's interactive-only run then prefilled
                # two thirds of its prompts in full (p90 287–332 ms against 137–160 ms warm, runs B–D)
                cap_probe = await capacity(st.url, cap_b_reqs, clients, max(3.0, args.capacity_seconds / 2), args.capacity_warmup)
                # the job must outlast every window: sized from the probe with a margin for box-load swings
                lines = int(max(cap_probe, 1.0) * 1.5 * (args.seconds + args.ramp) * args.lines_factor) + 100
                await asyncio.sleep(args.settle)
                warm = interactive if args.full_warmup else interactive[: max(1, len(interactive) // 3)]
                await bi.one_run(st.url, "warmup", -1, warm, [], args)
                if args.full_warmup:
                    await asyncio.sleep(args.settle)
                    await mixed_run(st.url, -1, interactive, args, lines)
                print(f"warm-up done (capacity probe {cap_probe:.2f} lines/s → {lines} lines per job; {'full trace alone and beside a job' if args.full_warmup else 'a third of the trace'})", file=sys.stderr, flush=True)
                await asyncio.sleep(args.settle)
                async with aiohttp.ClientSession() as ms:
                    for rnd in range(args.rounds):
                        row: dict[str, Any] = {"round": rnd, "order": list(round_order(rnd)), "batch_file_seed": args.seed + rnd}
                        for kind in round_order(rnd):
                            if kind == "capacity":
                                row["C_i"] = await capacity(st.url, cap_i_reqs, clients, args.capacity_seconds, args.capacity_warmup)
                                await asyncio.sleep(args.settle)
                                row["C_b"] = await capacity(st.url, cap_b_reqs, clients, args.capacity_seconds, args.capacity_warmup)
                                print(f"round {rnd} capacity         interactive shape {row['C_i']:.2f} req/s, batch shape {row['C_b']:.2f} lines/s", file=sys.stderr, flush=True)
                            elif kind == "mixed":
                                m0 = await batch_dispatch_metrics(ms, bs.url)
                                res, bw = await mixed_run(st.url, rnd, interactive, args, lines)
                                m1 = await batch_dispatch_metrics(ms, bs.url)
                                bw["dispatch_delta"] = {k: m1[k] - m0.get(k, 0.0) for k in m1 if m1[k] != m0.get(k, 0.0) and "total" in k}
                                row["batch"] = bw
                                row["B"] = bw["lines_per_s"]
                                row["p90_mixed_ms"] = percentile([x.ttft_ms for x in res.interactive if x.ok], 90)
                                row["mixed_errors"] = sum(1 for x in res.interactive if not x.ok)
                                runs.append(res)
                                print(f"round {rnd} mixed            interactive TTFT p90 {row['p90_mixed_ms']:7.1f} ms  batch {row['B']:.2f} lines/s", file=sys.stderr, flush=True)
                            else:
                                res = await bi.one_run(st.url, kind, rnd, interactive, [], args)
                                runs.append(res)
                                row["I"] = sum(1 for x in res.interactive if x.ok) / args.seconds
                                row["p90_only_ms"] = percentile([x.ttft_ms for x in res.interactive if x.ok], 90)
                                row["only_errors"] = sum(1 for x in res.interactive if not x.ok)
                                print(f"round {rnd} interactive-only interactive TTFT p90 {row['p90_only_ms']:7.1f} ms", file=sys.stderr, flush=True)
                            await asyncio.sleep(args.settle)
                        row["S"] = row["C_b"] * (1.0 - row["I"] / row["C_i"])
                        row["spare_used"] = row["B"] / row["S"] if row["S"] > 0 else float("nan")
                        row["ratio"] = row["p90_mixed_ms"] / row["p90_only_ms"] if row["p90_only_ms"] else float("nan")
                        row["load_avg_1m"] = os.getloadavg()[0]
                        rounds.append(row)
                        print(f"round {rnd}: spare {row['S']:.2f} lines/s, used {row['spare_used'] * 100:.1f} %, TTFT p90 ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)
                    batch_metrics = await batch_dispatch_metrics(ms, bs.url)
            finally:
                await bs.stop()
    finally:
        await stop_process(sim)

    only = bi.summarize(runs, "interactive-only")
    mixed = bi.summarize(runs, "mixed")
    med = {k: _median([r[k] for r in rounds]) for k in ("C_i", "C_b", "I", "S", "B", "spare_used", "p90_only_ms", "p90_mixed_ms", "ratio")}
    # pooled over the rounds, for comparison: TTFT p90 of all interactive-only vs all mixed requests; spare from the
    # mean capacities and load, batch use over all windows
    pooled_ratio = mixed["ttft_p90_ms"] / only["ttft_p90_ms"] if only["ttft_p90_ms"] else float("nan")
    mean = {k: statistics.fmean(r[k] for r in rounds) for k in ("C_i", "C_b", "I")}
    pooled_spare = mean["C_b"] * (1.0 - mean["I"] / mean["C_i"])
    pooled_b = sum(r["batch"]["lines_done"] for r in rounds) / sum(r["batch"]["window_s"] for r in rounds)
    pooled_used = pooled_b / pooled_spare if pooled_spare > 0 else float("nan")
    errors = sum(r["only_errors"] + r["mixed_errors"] for r in rounds)
    failed_lines = sum(r["batch"]["lines_failed"] for r in rounds)
    met = med["ratio"] <= 1.10 and med["spare_used"] >= 0.70 and errors == 0 and failed_lines == 0
    load_end = os.getloadavg()
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "reserved_pods": reserved_pods,
        "condition": {"processes": "fresh (cold start), one warm-up stage, every measured stage warm",
                      "warmup": "capacity probe, whole trace alone, whole trace beside a job" if args.full_warmup else "capacity probe, a third of the trace",
                      "lines_per_job": lines,
                      "load_avg_start": load_start, "load_avg_end": load_end, "wall_s": time.time() - t_start},
        "seeds": {"interactive_trace": args.seed, "batch_files": [r["batch_file_seed"] for r in rounds], "sim": args.seed},
        "rounds": rounds, "median": med,
        "pooled": {"ttft_p90_ratio": pooled_ratio, "spare_req_s": pooled_spare, "batch_lines_s": pooled_b, "spare_used": pooled_used},
        "goal": {"judged_on": "median over rounds of the per-round ratio and spare used", "met": met, "interactive_errors": errors, "batch_lines_failed": failed_lines},
        "interactive_only": only, "mixed": mixed, "batch_dispatch_metrics": batch_metrics,
    }  # fmt: skip
    print()
    print(f"fleet: {args.pods} pods llama3-8b-h100 max_num_seqs={args.max_seqs}, time-scale {args.time_scale}; batch-interactive, headroom {args.headroom} slots/pod, "
          f"{reserved_pods} pod(s) kept free of batch; "
          f"dispatcher {args.dispatcher}")  # fmt: skip
    print(f"condition: fresh processes, warm-up stage, then {args.rounds} warm rounds (stage order mirrored between rounds); seeds: interactive {args.seed}, "
          f"batch files {[r['batch_file_seed'] for r in rounds]}, sim {args.seed}; load average {load_start[0]:.1f} → {load_end[0]:.1f}")  # fmt: skip
    print(f"shapes: interactive {args.prompt_tokens}→{args.output_tokens} tokens at {args.rate}/s; batch {args.batch_prompt_tokens}→{args.batch_output_tokens // 2}–{args.batch_output_tokens + args.batch_output_tokens // 2} tokens (uniform)")
    print()
    print("| round | order | C_i req/s | C_b lines/s | I req/s | spare S lines/s | batch B lines/s | spare used | TTFT p90 only ms | TTFT p90 mixed ms | ratio | 429s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        n429 = r["batch"]["dispatch_delta"].get('extproc_batch_dispatch_responses_total{code="429"}', 0.0)
        print(f"| {r['round']} | {' → '.join(r['order'])} | {r['C_i']:.2f} | {r['C_b']:.2f} | {r['I']:.2f} | {r['S']:.2f} | {r['B']:.2f} | {r['spare_used'] * 100:.1f} % | "
              f"{r['p90_only_ms']:.1f} | {r['p90_mixed_ms']:.1f} | {r['ratio']:.3f} | {n429:.0f} | {r['load_avg_1m']:.1f} |")  # fmt: skip
    print(f"| **median** | | {med['C_i']:.2f} | {med['C_b']:.2f} | {med['I']:.2f} | {med['S']:.2f} | {med['B']:.2f} | **{med['spare_used'] * 100:.1f} %** | "
          f"{med['p90_only_ms']:.1f} | {med['p90_mixed_ms']:.1f} | **{med['ratio']:.3f}** | | |")  # fmt: skip
    print(f"| pooled | | | | | {pooled_spare:.2f} | {pooled_b:.2f} | {pooled_used * 100:.1f} % | {only['ttft_p90_ms']:.1f} | {mixed['ttft_p90_ms']:.1f} | {pooled_ratio:.3f} | | |")
    print()
    print(f"interactive ok: only {only['interactive_ok']}/{only['interactive_sent']}, mixed {mixed['interactive_ok']}/{mixed['interactive_sent']}; batch lines failed {failed_lines}")
    print(f"batch dispatcher: {batch_metrics}")
    print(f"median TTFT p90 ratio {med['ratio']:.3f} (goal ≤ 1.10), median spare used {med['spare_used'] * 100:.1f} % (goal ≥ 70 %): {'met' if met else 'NOT met'}")
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
    p.add_argument("--rounds", type=int, default=3, help="rounds of capacity + interactive-only + mixed; the goal is judged on medians")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--batch-prompt-tokens", type=int, default=64)
    p.add_argument("--batch-output-tokens", type=int, default=64)
    p.add_argument("--batch-max-concurrency", type=int, default=100)
    p.add_argument("--decrease-factor", type=float, default=0.5)
    p.add_argument("--backoff", type=float, default=0.1)
    p.add_argument("--backoff-cap", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--reserved-pods", type=int, default=None, help="batch-reserve-filter reservedPods: pods kept free of batch work (default: the batch-interactive config's, i.e. the filter's default)")
    p.add_argument("--full-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="warm up with the whole interactive trace alone and beside a job (default); --no-full-warmup: a third of the trace (runs A–D)")
    p.add_argument("--dispatcher", choices=("headroom", "aimd"), default="headroom", help="headroom: the batch server sizes its concurrency from x-gateway-batch-headroom; aimd: --no-gateway-headroom")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(parse_args())))
