"""Batch and interactive traffic on one fleet: does batch fill idle capacity without hurting interactive TTFT?

Real time, through real Envoy + ``extproc serve`` (subprocess) + a simulated fleet (``extproc sim``, its own
process), with ``extproc/configs/batch-interactive.yaml`` (objectives ``interactive`` → 10, ``batch`` → -1,
flow control on, saturation thresholds that keep headroom for interactive requests).

    .venv/bin/python benchmarks/batch_interactive.py [--rate 6] [--batch-rate 30] [--seconds 10] [--rounds 2]

Two runs per round, order alternating between rounds, on the SAME fleet and stack:

* ``interactive-only``: Poisson interactive arrivals at ``--rate`` (a fixed trace: same seed in every run);
* ``mixed``: the same interactive trace plus batch jobs arriving Poisson at ``--batch-rate`` (offered well above
  the spare capacity). A batch job retries every 429 with capped exponential backoff and jitter, like a batch
  client would, until it completes or the run's drain deadline passes (then it is counted as abandoned).

Printed per run kind (all rounds pooled): interactive TTFT p50/p90/p99, interactive errors (any non-200 is an
error: interactive must never be shed), batch completed / 429 answers / jobs retried / abandoned, output tok/s
(interactive, batch). The headline is the ratio of interactive TTFT p90 (mixed / interactive-only).

The fleet: ``--pods`` pods of the ``llama3-8b-h100`` profile with ``max_num_seqs`` lowered to ``--max-seqs`` (a
latency-tuned deployment: a small engine batch makes the slots, not the KV cache, the scarce resource) and
``--time-scale`` slowing every simulated duration so the whole stack fits on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from extproc.bench.client import send_one
from extproc.bench.report import RequestResult, percentile
from extproc.bench.workloads import MODEL, WorkloadRequest, text

CONFIG = "batch-interactive"


@dataclass(slots=True)
class ClassRequest(WorkloadRequest):
    """A workload request that names its objective (``x-gateway-inference-objective``)."""

    objective: str = ""
    attempt: int = 0

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", "x-request-id": f"{self.objective}-{self.index}-{self.attempt}"}
        if self.objective:
            h["x-gateway-inference-objective"] = self.objective
        return h


def make_trace(objective: str, rate: float, seconds: float, seed: int, prompt_tokens: int, output_tokens: int, start_index: int = 0) -> list[ClassRequest]:
    """Poisson arrivals at ``rate`` for ``seconds``; prompts of ~``prompt_tokens`` tokens, fixed output length."""
    rng = random.Random(f"{objective}-{seed}")
    out: list[ClassRequest] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        n = len(out)
        out.append(
            ClassRequest(
                index=start_index + n, stage=0, arrival=t, api="completions", model=MODEL, max_tokens=output_tokens,
                parts=(text(rng, prompt_tokens),), objective=objective,
            )
        )  # fmt: skip


@dataclass(slots=True)
class BatchTally:
    jobs: int = 0
    completed: int = 0
    shed_429: int = 0  # 429 answers received (each one a retry or, at the deadline, an abandonment)
    retried_jobs: int = 0  # jobs that needed at least one retry
    abandoned: int = 0  # jobs still not done at the drain deadline
    other_errors: int = 0
    output_tokens: int = 0
    e2e_ms: list[float] = field(default_factory=list)


async def batch_job(session: aiohttp.ClientSession, url: str, req: ClassRequest, t0: float, deadline: float, tally: BatchTally, rng: random.Random, backoff_s: float, backoff_cap_s: float) -> None:
    tally.jobs += 1
    delay = req.arrival - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    first = time.perf_counter()
    wait = backoff_s
    while True:
        res = await send_one(session, url, req, t0, timeout_s=120.0)
        if res.ok:
            tally.completed += 1
            tally.output_tokens += res.output_tokens
            tally.e2e_ms.append((time.perf_counter() - first) * 1000.0)
            if req.attempt:
                tally.retried_jobs += 1
            return
        if res.status != 429:
            tally.other_errors += 1
            return
        tally.shed_429 += 1
        sleep = min(backoff_cap_s, wait) * (0.5 + rng.random())  # capped exponential backoff, ±50 % jitter
        if time.perf_counter() + sleep > deadline:
            tally.abandoned += 1
            if req.attempt:
                tally.retried_jobs += 1
            return
        await asyncio.sleep(sleep)
        wait *= 2.0
        req.attempt += 1


@dataclass(slots=True)
class RunResult:
    kind: str
    round: int
    wall_s: float
    interactive: list[RequestResult]
    batch: BatchTally | None


async def one_run(url: str, kind: str, rnd: int, interactive: Sequence[ClassRequest], batch: Sequence[ClassRequest], args: argparse.Namespace) -> RunResult:
    connector = aiohttp.TCPConnector(limit=0)
    tally = BatchTally() if batch else None
    results: list[RequestResult] = []
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        t0 = time.perf_counter()
        deadline = t0 + args.seconds + args.drain
        rng = random.Random(f"backoff-{rnd}")

        async def inter(r: ClassRequest) -> None:
            delay = r.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            results.append(await send_one(session, url, r, t0, timeout_s=120.0))

        tasks = [asyncio.create_task(inter(r)) for r in interactive]
        if tally is not None:
            fresh = [ClassRequest(**{k: getattr(b, k) for k in ("index", "stage", "arrival", "api", "model", "max_tokens", "parts", "objective")}) for b in batch]
            tasks += [asyncio.create_task(batch_job(session, url, b, t0, deadline, tally, rng, args.backoff, args.backoff_cap)) for b in fresh]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
    return RunResult(kind, rnd, wall, results, tally)


def summarize(runs: Sequence[RunResult], kind: str) -> dict[str, Any]:
    rs = [r for r in runs if r.kind == kind]
    inter = [x for r in rs for x in r.interactive]
    ok = [x for x in inter if x.ok]
    ttft = [x.ttft_ms for x in ok]
    wall = sum(r.wall_s for r in rs)
    out: dict[str, Any] = {
        "runs": len(rs),
        "interactive_sent": len(inter),
        "interactive_ok": len(ok),
        "interactive_errors": {str(s): sum(1 for x in inter if not x.ok and x.status == s) for s in sorted({x.status for x in inter if not x.ok})},
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "interactive_tok_s": sum(x.output_tokens for x in ok) / wall if wall else 0.0,
    }
    tallies = [r.batch for r in rs if r.batch is not None]
    if tallies:
        b = BatchTally()
        for t in tallies:
            b.jobs += t.jobs
            b.completed += t.completed
            b.shed_429 += t.shed_429
            b.retried_jobs += t.retried_jobs
            b.abandoned += t.abandoned
            b.other_errors += t.other_errors
            b.output_tokens += t.output_tokens
            b.e2e_ms += t.e2e_ms
        out["batch"] = {
            "jobs": b.jobs, "completed": b.completed, "shed_429": b.shed_429, "retried_jobs": b.retried_jobs,
            "abandoned": b.abandoned, "other_errors": b.other_errors, "batch_tok_s": b.output_tokens / wall if wall else 0.0,
            "job_e2e_p50_ms": percentile(b.e2e_ms, 50), "job_e2e_p90_ms": percentile(b.e2e_ms, 90),
        }  # fmt: skip
    return out


async def scheduler_counters(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """Requests by status and flow-control counters from the scheduler's /metrics (for the report)."""
    async with session.get(metrics_url + "/metrics") as r:
        body = await r.text()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(("extproc_requests_total", "extproc_flow_control")):
            name, _, val = line.rpartition(" ")
            try:
                out[name] = float(val)
            except ValueError:
                continue
    return out


async def main(args: argparse.Namespace) -> int:
    from extproc.harness import Stack, StackSpec, start_sim_process, stop_process
    from extproc.sim.profiles import get_profile

    wd = Path(tempfile.mkdtemp(prefix="batch-interactive-"))
    prof = get_profile("llama3-8b-h100").replace(name=f"llama3-8b-h100-seqs{args.max_seqs}", max_num_seqs=args.max_seqs)
    prof_path = wd / "profile.yaml"
    prof.to_yaml(prof_path)
    interactive = make_trace("interactive", args.rate, args.seconds, args.seed, args.prompt_tokens, args.output_tokens)
    batch = make_trace("batch", args.batch_rate, args.seconds, args.seed, args.batch_prompt_tokens, args.batch_output_tokens, start_index=1_000_000)
    sim, ready = await start_sim_process(["--pods", str(args.pods), "--profile", str(prof_path), "--model", MODEL, "--time-scale", str(args.time_scale), "--seed", str(args.seed)])
    runs: list[RunResult] = []
    counters: dict[str, float] = {}
    try:
        async with Stack(StackSpec(endpoints=ready["endpoints"], config=args.config, models=[MODEL], scrape_interval_s=args.scrape_interval)) as st:
            # warm-up: connections, tokenizer caches
            await one_run(st.url, "warmup", -1, interactive[: max(1, len(interactive) // 3)], [], args)
            for rnd in range(args.rounds):
                order = ("interactive-only", "mixed") if rnd % 2 == 0 else ("mixed", "interactive-only")
                for kind in order:
                    res = await one_run(st.url, kind, rnd, interactive, batch if kind == "mixed" else [], args)
                    runs.append(res)
                    print(f"round {rnd} {kind:16s} wall {res.wall_s:5.1f}s  interactive TTFT p90 {percentile([x.ttft_ms for x in res.interactive if x.ok], 90):7.1f} ms", file=sys.stderr, flush=True)
                    await asyncio.sleep(args.settle)  # let the fleet empty before the next run
            if st.metrics_url:
                async with aiohttp.ClientSession() as s:
                    counters = await scheduler_counters(s, st.metrics_url)
    finally:
        await stop_process(sim)

    only = summarize(runs, "interactive-only")
    mixed = summarize(runs, "mixed")
    ratio = mixed["ttft_p90_ms"] / only["ttft_p90_ms"] if only["ttft_p90_ms"] else float("nan")
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "interactive_requests_per_run": len(interactive),
        "batch_jobs_per_run": len(batch),
        "interactive_only": only,
        "mixed": mixed,
        "ttft_p90_ratio": ratio,
        "scheduler_counters": counters,
    }
    b = mixed.get("batch", {})
    print()
    print(f"fleet: {args.pods} pods, llama3-8b-h100 max_num_seqs={args.max_seqs}, time-scale {args.time_scale}; config {args.config}")
    print(f"interactive {args.rate}/s ({len(interactive)} per run), batch jobs offered {args.batch_rate}/s ({len(batch)} per run), {args.rounds} rounds × {args.seconds:.0f} s")
    print()
    print("| run | interactive ok/sent | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | interactive tok/s | batch done/jobs | batch 429s | jobs retried | abandoned | batch tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in (("interactive-only", only), ("mixed", mixed)):
        bb = s.get("batch")
        bcols = f"{bb['completed']}/{bb['jobs']} | {bb['shed_429']} | {bb['retried_jobs']} | {bb['abandoned']} | {bb['batch_tok_s']:.0f}" if bb else "– | – | – | – | –"
        print(f"| {name} | {s['interactive_ok']}/{s['interactive_sent']} | {s['ttft_p50_ms']:.1f} | {s['ttft_p90_ms']:.1f} | {s['ttft_p99_ms']:.1f} | {s['interactive_tok_s']:.0f} | {bcols} |")
    print()
    goal = ratio <= 1.10 and b.get("completed", 0) > 0 and not mixed["interactive_errors"]
    print(f"interactive TTFT p90 ratio (mixed / interactive-only): {ratio:.3f}  (goal <= 1.10 with batch completing: {'met' if goal else 'NOT met'})")
    if mixed["interactive_errors"] or only["interactive_errors"]:
        print(f"interactive errors: only={only['interactive_errors']} mixed={mixed['interactive_errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--max-seqs", type=int, default=8, help="engine max_num_seqs of every simulated pod")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--scrape-interval", type=float, default=0.05)
    p.add_argument("--rate", type=float, default=6.0, help="interactive requests/s")
    p.add_argument("--batch-rate", type=float, default=30.0, help="batch jobs offered per second")
    p.add_argument("--seconds", type=float, default=10.0, help="arrival window of one run")
    p.add_argument("--drain", type=float, default=5.0, help="batch jobs not done this long after the window are abandoned")
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=24)
    p.add_argument("--batch-prompt-tokens", type=int, default=300)
    p.add_argument("--batch-output-tokens", type=int, default=48)
    p.add_argument("--backoff", type=float, default=0.25, help="first retry delay of a batch job, seconds")
    p.add_argument("--backoff-cap", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(parse_args())))
