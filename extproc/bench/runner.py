"""Real-time benchmark: every setup runs through a real proxy (ours through real Envoy + ``extproc serve``) in
front of a simulated fleet, replaying the same trace.

Processes: the fleet (``extproc sim``) runs in its own subprocess, the scheduler in its own (the harness
default), Envoy / the peer router in its own; only the load generator runs on this event loop. Each setup gets
a freshly started fleet, so every setup starts with cold prefix caches. With ``repeat`` > 1 the setup order is
rotated every round (A B C, B C A, ...), so slow drift of the shared machine spreads over all setups.

Stages run back to back; each stage's requests are drained before the next stage starts, and the pods'
``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total`` are read before and after each stage.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.bench import peers
from extproc.bench.client import replay
from extproc.bench.report import RequestResult, SetupRun
from extproc.bench.setups import SetupSpec, config_available
from extproc.bench.workloads import MODEL, Workload

log = logging.getLogger(__name__)

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"


@dataclass(slots=True)
class FleetOptions:
    fleet: str  # "N" or "profile:N,profile:M"
    kv_blocks: int | None = None
    loras: tuple[str, ...] = ()
    time_scale: float = 1.0
    seed: int = 0
    warm_start: str | None = None  # predictor configs: a latency-model file; None = cold (learn online)
    stream: bool = True
    pd_prefill: int = 0  # P/D setups: prefill-role pods of the fleet (0 = half)
    link: str = "rdma-400g"
    kv_failure_rate: float = 0.0
    kv_load_failure_policy: str = "fail"

    def sim_args(self, kv_events: bool, pd: bool = False) -> list[str]:
        if self.fleet.strip().isdigit():
            args = ["--pods", self.fleet.strip()]
        else:
            args = ["--fleet", self.fleet]
        args += ["--base-port", "0", "--model", MODEL, "--time-scale", str(self.time_scale), "--seed", str(self.seed)]
        if self.kv_blocks:
            args += ["--kv-blocks", str(self.kv_blocks)]
        if self.loras:
            args += ["--lora", ",".join(self.loras)]
        if kv_events:
            args.append("--kv-events")
        if pd:
            n = int(self.fleet) if self.fleet.strip().isdigit() else sum(c for _, c in _parse_fleet(self.fleet))
            args += ["--pd-prefill", str(self.pd_prefill or n // 2), "--link", self.link,
                     "--kv-failure-rate", str(self.kv_failure_rate), "--kv-load-failure-policy", self.kv_load_failure_policy]
        return args


def _parse_fleet(spec: str) -> list[tuple[str, int]]:
    from extproc.sim.profiles import parse_fleet

    return parse_fleet(spec)


def parse_counters(text: str) -> tuple[float, float]:
    """(prefix cache hits, queries) summed over every series in one /metrics page."""
    hits = queries = 0.0
    for line in text.splitlines():
        if line.startswith(HITS):
            hits += float(line.rsplit(" ", 1)[-1])
        elif line.startswith(QUERIES):
            queries += float(line.rsplit(" ", 1)[-1])
    return hits, queries


async def scrape_counters(session: aiohttp.ClientSession, endpoints: list[str]) -> tuple[float, float]:
    async def one(addr: str) -> tuple[float, float]:
        async with session.get(f"http://{addr}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return parse_counters(await r.text())

    pairs = await asyncio.gather(*(one(a) for a in endpoints))
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def parse_predictor(text: str) -> dict[str, float] | None:
    """The latency predictor's counters from the scheduler's /metrics page (None: no predictor there)."""
    vals: dict[str, float] = {"decisions": 0.0, "fallback_decisions": 0.0, "retrains": 0.0, "samples": 0.0}
    for line in text.splitlines():
        if not line.startswith("extproc_predictor_"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if name.startswith("extproc_predictor_fallback_total"):
            vals["fallback_decisions"] += v
            vals["decisions"] += v
        elif name == "extproc_predictor_predictions_total":
            vals["decisions"] += v
        elif name == "extproc_predictor_retrains_total":
            vals["retrains"] = v
        elif name == "extproc_predictor_samples":
            vals["samples"] = v
        elif name in ("extproc_predictor_ttft_mape", "extproc_predictor_tpot_mape"):
            vals[name.removeprefix("extproc_predictor_")] = v if v == v else None  # type: ignore[assignment]
    # the metrics exist (at 0) whenever the predictor module is loaded; a config without a predictor never moves them
    return vals if vals["decisions"] or vals["samples"] else None


async def scrape_predictor(session: aiohttp.ClientSession, metrics_url: str | None) -> dict[str, float] | None:
    if not metrics_url:
        return None
    try:
        async with session.get(f"{metrics_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return parse_predictor(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def scrape_sum(session: aiohttp.ClientSession, endpoints: list[str], name: str) -> float:
    """Sum of every sample of ``name`` over the pods' /metrics."""
    total = 0.0
    for addr in endpoints:
        async with session.get(f"http://{addr}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name):
                    total += float(line.rsplit(" ", 1)[-1])
    return total


def real_availability(setup: SetupSpec) -> str | None:
    if setup.kind == "peer":
        return peers.availability(setup.name)
    if setup.kind in ("envoy", "extproc"):
        from extproc.envoy_runner import EnvoyProcess  # noqa: F401  (the import itself checks the module)

        if setup.kind == "extproc" and setup.config:
            return config_available(setup.config)
    return None


async def _run_one(
    workload: Workload,
    setup: SetupSpec,
    fleet: FleetOptions,
    out_dir: str,
    round_no: int,
    on_done: Callable[[RequestResult], None],
) -> tuple[list[RequestResult], list[tuple[float, float] | None], dict[str, Any]]:
    from extproc.harness import Stack, StackSpec, start_sidecar_process, start_sim_process, stop_process

    proc, info = await start_sim_process(fleet.sim_args(kv_events=setup.kv_events, pd=setup.pd))
    sidecar_proc: asyncio.subprocess.Process | None = None
    try:
        endpoints: list[str] = list(info["endpoints"])
        labels: dict[str, dict[str, str]] = dict(info.get("labels") or {})
        config: dict[str, Any] = {"kind": setup.kind, "mode": "real", "pods": len(endpoints), "fleet": fleet.fleet}
        routed = endpoints  # what the proxy routes to
        prefill_pods = [a for a in endpoints if labels.get(a, {}).get("llm-d.ai/role") == "prefill"]
        decode_pods = [a for a in endpoints if a not in prefill_pods]
        if setup.pd:
            config.update(prefill_pods=prefill_pods, decode_pods=decode_pods, link=fleet.link,
                          kv_failure_rate=fleet.kv_failure_rate, kv_load_failure_policy=fleet.kv_load_failure_policy)
        if setup.pd and setup.kind == "extproc":
            # the decode pods sit behind extproc pd-sidecar (the routing destination is the sidecar, as in llm-d)
            sidecar_proc, cars = await start_sidecar_process(decode_pods)
            routed = prefill_pods + list(cars)
            labels = {**{a: labels[a] for a in prefill_pods}, **{c: labels[u] for c, u in cars.items()}}
            config["sidecars"] = cars
        proxy: Any
        if setup.kind == "peer":
            if setup.pd:
                proxy = peers.PeerRouter(
                    setup.name, [f"http://{a}" for a in decode_pods], log_path=os.path.join(out_dir, f"{setup.name}.r{round_no}.log"),
                    prefill_urls=[f"http://{a}" for a in prefill_pods],
                )
            else:
                proxy = peers.PeerRouter(
                    setup.name, [f"http://{a}" for a in endpoints], log_path=os.path.join(out_dir, f"{setup.name}.r{round_no}.log")
                )
            config.update(proxy.config())
        else:
            spec = StackSpec(
                endpoints=routed,
                config=setup.config if setup.kind == "extproc" else None,
                lb_policy=setup.lb_policy,
                labels=labels,
                kv_events=info.get("kv_events") if setup.kv_events else None,
                models=[MODEL, *fleet.loras],
                scheduler_args=["--seed", str(fleet.seed), "--predictor-warm-start", fleet.warm_start or "none"]
                + (["--tokenizer", f"{MODEL}=sim"] if setup.kv_events else []),
                replicas=setup.replicas,
            )
            proxy = Stack(spec)
            config.update({"proxy": "envoy", "lb_policy": setup.lb_policy} if setup.kind == "envoy" else
                          {"proxy": "envoy+extproc", "config": setup.config, "scheduler_replicas": setup.replicas})
        results: list[RequestResult] = []
        prefix: list[tuple[float, float] | None] = []
        pred_stages: list[dict[str, float]] = []
        pred_last: dict[str, Any] | None = None
        async with proxy, aiohttp.ClientSession() as scraper:
            url = proxy.url
            bounds = workload.stage_bounds()
            for i, (start, _end) in enumerate(bounds):
                reqs = workload.stage_requests(i)
                before = await scrape_counters(scraper, endpoints)
                pred0 = await scrape_predictor(scraper, getattr(proxy, "metrics_url", None))
                rs = await replay(url, reqs, time_offset=start, on_done=on_done, stream=fleet.stream)
                after = await scrape_counters(scraper, endpoints)
                pred1 = await scrape_predictor(scraper, getattr(proxy, "metrics_url", None))
                results.extend(rs)
                prefix.append((after[0] - before[0], after[1] - before[1]))
                if pred1 is not None:
                    pred_stages.append({k: pred1[k] - (pred0 or {}).get(k, 0.0) for k in ("decisions", "fallback_decisions", "retrains", "samples")})
                    pred_last = pred1
            if setup.pd:  # how many KV transfers the decode pods actually loaded (NixlConnector's histogram)
                config["kv_transfers"] = int(await scrape_sum(scraper, decode_pods, "vllm:nixl_xfer_time_seconds_count"))
            if pred_last is not None:
                config["predictor"] = {
                    "warm_start": fleet.warm_start,
                    "samples_trained": int(pred_last["samples"]),
                    "retrains": int(pred_last["retrains"]),
                    "fallback_decisions": int(pred_last["fallback_decisions"]),
                    "decisions": int(pred_last["decisions"]),
                    "online_ttft_mape": pred_last.get("ttft_mape"),
                    "online_tpot_mape": pred_last.get("tpot_mape"),
                    "stages": [{k: int(v) for k, v in st.items()} for st in pred_stages],
                    "source": "the scheduler's /metrics (extproc_predictor_*)",
                }
        return results, prefix, config
    finally:
        if sidecar_proc is not None:
            await stop_process(sidecar_proc)
        await stop_process(proc)


async def run_setups(
    workload: Workload,
    setups: list[SetupSpec],
    fleet: FleetOptions,
    out_dir: str,
    *,
    repeat: int = 1,
    show_progress: bool = True,
) -> list[SetupRun]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    os.makedirs(out_dir, exist_ok=True)
    runs: dict[str, SetupRun] = {}
    todo: list[SetupSpec] = []
    for s in setups:
        why = real_availability(s)
        if why:
            log.warning("setup skipped", extra={"setup": s.name, "reason": why})
            runs[s.name] = SetupRun(s.name, "skipped", why)
        else:
            todo.append(s)
            runs[s.name] = SetupRun(s.name, "ok", results=[], prefix=None, repeats=0)
    prefix_sums: dict[str, list[list[float]]] = {s.name: [[0.0, 0.0] for _ in workload.stages] for s in todo}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress
    ) as prog:
        tasks = {s.name: prog.add_task(f"[real] {s.name}", total=len(workload.requests) * repeat) for s in todo}
        for r in range(repeat):
            order = todo[r % len(todo):] + todo[: r % len(todo)] if todo else []
            for s in order:
                run = runs[s.name]
                if run.status != "ok":
                    continue
                task = tasks[s.name]
                try:
                    rs, prefix, cfg = await _run_one(workload, s, fleet, out_dir, r, lambda _res, t=task: prog.advance(t, 1))
                except Exception as e:  # a setup that cannot start is reported, never dropped
                    log.exception("setup failed", extra={"setup": s.name})
                    runs[s.name] = SetupRun(s.name, "failed", f"{type(e).__name__}: {e}"[:500])
                    continue
                assert run.results is not None
                run.results.extend(rs)
                run.config = cfg
                run.repeats += 1
                for i, p in enumerate(prefix):
                    if p is not None:
                        prefix_sums[s.name][i][0] += p[0]
                        prefix_sums[s.name][i][1] += p[1]
    for name, sums in prefix_sums.items():
        run = runs[name]
        if run.status == "ok":
            run.prefix = [(h, q) for h, q in sums]
            if run.config is not None:
                run.config["repeats"] = run.repeats
    return [runs[s.name] for s in setups]
