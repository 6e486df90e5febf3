"""``extproc demo``: real Envoy + a simulated vLLM fleet + the scheduler + a mixed workload, with a summary.

Everything runs on free loopback ports and is torn down at the end. The workload mixes completions and chat,
streaming and not, with shared prefixes (a few system prompts reused across many requests), so prefix-aware
routing has something to do. ``served_as_picked`` counts responses whose serving pod (the simulator's
``x-inference-pod`` header) equals the scheduler's pick (``x-gateway-destination-endpoint-served``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

DEMO_MODEL = "sim-llama"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=4, help="simulated vLLM pods (default 4)")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--config", default="default", help="scheduler profile: built-in name or YAML path")
    p.add_argument("--profile", default="llama3-8b-h100", help="simulator profile of every pod")
    p.add_argument("--fleet", default=None, help="heterogeneous fleet, e.g. llama3-8b-h100:2,llama3-8b-l40s:2")
    p.add_argument("--time-scale", type=float, default=0.2, help="simulated time × this (smaller = faster demo)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--kv-events", action="store_true", help="simulator publishes KV events; scheduler subscribes (use with --config precise-prefix)")
    p.add_argument("--batch", action="store_true", help="also run `extproc batch serve` behind Envoy and a batch job beside the interactive workload (config batch-interactive unless --config is given)")
    p.add_argument("--batch-lines", type=int, default=300, help="lines of the --batch job (default 300)")
    p.add_argument("--pd", action="store_true",
                   help="prefill/decode disaggregation: the fleet split into prefill and decode pods, extproc pd-sidecar "
                        "in front of each decode pod, config pd unless --config is given")
    p.add_argument("--pd-prefill", type=int, default=None, help="--pd: prefill pods (default: half the pods)")
    p.add_argument("--replicas", type=int, default=1,
                   help="active-active: N `extproc serve` replicas behind Envoy's ext_proc cluster, sharing state through a "
                        "redis-server the demo starts (docs/active-active.md)")
    p.add_argument("--failure-mode", choices=["fail-close", "fail-open"], default="fail-close",
                   help="Envoy's ext_proc failure mode (default fail-close)")
    p.add_argument("--kill-replica", action="store_true",
                   help="with --replicas >= 2: SIGKILL the last replica halfway through the requests (every request must still succeed)")


@dataclass(slots=True)
class Result:
    kind: str
    status: int
    picked: str
    served: str
    ttft_ms: float
    e2e_ms: float
    output_tokens: int
    error: str = ""
    prefill: str = ""  # P/D: the prefill pod of a split request (x-pd-prefill-endpoint from the sidecar)


@dataclass(slots=True)
class Workload:
    items: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (path, body, kind)


def build_workload(n: int, seed: int) -> Workload:
    rng = random.Random(seed)
    topics = ["astronomy", "cooking", "databases", "gardening", "music theory", "networking"]
    systems = [
        f"You are a meticulous assistant specialised in {t}. " + " ".join(f"Rule {i}: answer about {t} precisely and cite step {i}." for i in range(40))
        for t in topics
    ]
    wl = Workload()
    for i in range(n):
        g = rng.randrange(len(systems))
        question = f"Question {i}: explain idea {rng.randrange(10_000)} in {topics[g]} to a newcomer."
        max_tokens = rng.choice([8, 16, 32, 64])
        stream = rng.random() < 0.5
        if rng.random() < 0.5:
            body: dict[str, Any] = {"model": DEMO_MODEL, "prompt": systems[g] + "\n" + question, "max_tokens": max_tokens, "stream": stream}
            path, kind = "/v1/completions", "completions"
        else:
            body = {"model": DEMO_MODEL, "messages": [{"role": "system", "content": systems[g]}, {"role": "user", "content": question}], "max_tokens": max_tokens, "stream": stream}
            path, kind = "/v1/chat/completions", "chat"
        if stream:
            body["stream_options"] = {"include_usage": True}
            kind += "+stream"
        wl.items.append((path, body, kind))
    return wl


async def send(session: Any, url: str, path: str, body: dict[str, Any], kind: str, headers: dict[str, str] | None = None) -> Result:
    t0 = time.perf_counter()
    ttft = 0.0
    out_tokens = 0
    try:
        async with session.post(url + path, json=body, headers=headers or {}) as r:
            picked = r.headers.get("x-gateway-destination-endpoint-served", "")
            served = r.headers.get("x-inference-pod", "")
            prefill = r.headers.get("x-pd-prefill-endpoint", "")
            if body.get("stream") and r.status == 200:
                buf = b""
                async for chunk in r.content.iter_any():
                    if not ttft:
                        ttft = (time.perf_counter() - t0) * 1000
                    buf = (buf + chunk)[-4096:]
                ok = b"[DONE]" in buf
                import re

                m = re.findall(rb'"completion_tokens"\s*:\s*(\d+)', buf)
                out_tokens = int(m[-1]) if m else 0
                err = "" if ok else "stream ended without [DONE]"
            else:
                data = await r.read()
                ttft = (time.perf_counter() - t0) * 1000
                err = ""
                if r.status == 200:
                    out_tokens = int(json.loads(data).get("usage", {}).get("completion_tokens", 0))
                else:
                    err = data[:300].decode(errors="replace")
            return Result(kind, r.status if not err or r.status != 200 else 599, picked, served, ttft, (time.perf_counter() - t0) * 1000, out_tokens, err, prefill)
    except Exception as e:  # report, never crash the demo
        return Result(kind, 0, "", "", 0.0, (time.perf_counter() - t0) * 1000, 0, f"{type(e).__name__}: {e}")


def batch_input(n: int, seed: int) -> bytes:
    """A batch input file: chat lines grouped on a few shared system prompts (prefix reuse)."""
    rng = random.Random(f"batch-{seed}")
    systems = [f"You label {t} documents. " + "Label each one carefully and briefly. " * 30 for t in ("legal", "medical", "retail")]
    out = []
    for i in range(n):
        body = {"model": DEMO_MODEL, "messages": [{"role": "system", "content": systems[i % 3]}, {"role": "user", "content": f"document {i}: {rng.randrange(10**6)}"}], "max_tokens": rng.choice([8, 16, 32])}
        out.append(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(out) + "\n").encode()


async def batch_submit(session: Any, url: str, data: bytes) -> str:
    """Upload the file and create the batch through Envoy (the OpenAI Batch API); returns the batch id."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename="demo-batch.jsonl", content_type="application/jsonl")
    async with session.post(url + "/v1/files", data=form) as r:
        f = await r.json()
        if r.status != 200:
            raise RuntimeError(f"batch file upload failed: {r.status} {f}")
    async with session.post(url + "/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h", "metadata": {"job": "demo"}}) as r:
        b = await r.json()
        if r.status != 200:
            raise RuntimeError(f"batch create failed: {r.status} {b}")
    return str(b["id"])


async def batch_wait(session: Any, url: str, batch_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.get(f"{url}/v1/batches/{batch_id}") as r:
            b: dict[str, Any] = await r.json()
        if b.get("status") in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return b
        await asyncio.sleep(0.25)


async def batch_output_check(session: Any, url: str, b: dict[str, Any], n: int) -> bool:
    """Every custom_id exactly once across the output and error files."""
    ids: list[str] = []
    for k in ("output_file_id", "error_file_id"):
        if b.get(k):
            async with session.get(f"{url}/v1/files/{b[k]}/content") as r:
                ids += [json.loads(x)["custom_id"] for x in (await r.text()).splitlines() if x.strip()]
    return sorted(ids) == sorted(f"doc-{i}" for i in range(n))


async def wait_for_scrapes(metrics_url: str, pods: int, timeout_s: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(metrics_url + "/debug/endpoints") as r:
                    eps = await r.json()
                if len(eps) == pods and all(e["healthy"] and e["metrics_age_s"] is not None for e in eps):
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("the scheduler did not scrape every pod in time")


async def scrape_pod_counters(endpoints: list[str]) -> dict[str, dict[str, float]]:
    import aiohttp

    from extproc.datalayer.scrape import parse_metrics

    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as s:
        for ep in endpoints:
            async with s.get(f"http://{ep}/metrics") as r:
                m = parse_metrics(await r.read())
            out[ep] = {"prefix_cache_hits": m.prefix_cache_hits, "prefix_cache_queries": m.prefix_cache_queries}
    return out


async def envoy_counter(session: Any, admin_url: str, name: str) -> int | None:
    """One counter from Envoy's admin ``/stats`` (None when Envoy does not have it: the config has no such cluster)."""
    async with session.get(f"{admin_url}/stats", params={"filter": f"^{name}$"}) as r:
        text = await r.text()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key.strip() == name:
            return int(value.strip())
    return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _histogram_quantile(text: str, name: str, q: float) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        if fam.name != name:
            continue
        buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
        buckets.sort()
        total = buckets[-1][1] if buckets else 0
        if not total:
            return None
        for le, c in buckets:
            if c >= q * total:
                return le
    return None


async def pd_spoof_check(session: Any, url: str) -> dict[str, Any]:
    """A client-supplied x-prefiller-host-port must never reach a sidecar (Envoy and the scheduler strip it)."""
    body = {"model": DEMO_MODEL, "prompt": "spoof check " * 400, "max_tokens": 2}
    async with session.post(url + "/v1/completions", json=body, headers={"x-prefiller-host-port": "127.0.0.1:1"}) as r:
        await r.read()
        used = r.headers.get("x-pd-prefill-endpoint", "")
        return {"status": r.status, "expected": 200, "ok": r.status == 200 and used != "127.0.0.1:1" and "x-pd-fallback" not in r.headers}


async def error_checks(session: Any, url: str) -> dict[str, dict[str, Any]]:
    """A few deliberate bad requests: each must get its status and a JSON error body."""
    cases = {
        "invalid_json": ("/v1/completions", b"{not json", {}, 400),
        "missing_model": ("/v1/completions", json.dumps({"prompt": "x"}).encode(), {}, 400),
        "unknown_model": ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), {}, 404),
        "spoofed_destination": ("/v1/completions", json.dumps({"model": DEMO_MODEL, "prompt": "x", "max_tokens": 2}).encode(), {"x-gateway-destination-endpoint": "127.0.0.1:1"}, 200),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (path, raw, hdrs, want) in cases.items():
        async with session.post(url + path, data=raw, headers={"content-type": "application/json", **hdrs}) as r:
            body = await r.read()
            try:
                j = json.loads(body)
                shaped = "error" in j and {"message", "type", "code"} <= set(j["error"]) if want != 200 else "choices" in j
            except ValueError:
                shaped = False
            out[name] = {"status": r.status, "expected": want, "ok": r.status == want and shaped}
    async with session.get(url + "/v1/models") as r:
        j = await r.json()
        out["list_models"] = {"status": r.status, "expected": 200, "ok": r.status == 200 and [m["id"] for m in j["data"]] == [DEMO_MODEL]}
    return out


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import contextlib
    import tempfile

    from extproc.harness import BatchServerProcess, Stack, StackSpec, start_sidecar_process, start_sim_process, stop_process
    from extproc.netutil import free_port

    console = Console(stderr=True)
    sim_args = ["--pods", str(args.pods), "--base-port", "0", "--model", DEMO_MODEL, "--time-scale", str(args.time_scale), "--seed", str(args.seed)]
    if args.fleet:
        sim_args += ["--fleet", args.fleet]
    else:
        sim_args += ["--profile", args.profile]
    if args.kv_events:
        sim_args.append("--kv-events")
    n_prefill = 0
    if args.pd:
        n_prefill = args.pd_prefill if args.pd_prefill is not None else max(1, args.pods // 2)
        sim_args += ["--pd-prefill", str(n_prefill)]
    console.print(f"[bold]extproc demo[/]: starting {args.pods} simulated vLLM pods, the scheduler ({args.config}) and real Envoy …")
    sim, info = await start_sim_process(sim_args)
    sidecar_proc = None
    cars: dict[str, str] = {}  # P/D: sidecar address → the decode pod behind it
    try:
        endpoints: list[str] = info["endpoints"]
        labels: dict[str, dict[str, str]] = dict(info.get("labels", {}))
        routed = endpoints
        if args.pd:
            prefill_pods = [e for e in endpoints if labels.get(e, {}).get("llm-d.ai/role") == "prefill"]
            decode_pods = [e for e in endpoints if e not in prefill_pods]
            sidecar_proc, cars = await start_sidecar_process(decode_pods)
            routed = prefill_pods + list(cars)
            labels = {**{e: labels[e] for e in prefill_pods}, **{c: labels[u] for c, u in cars.items()}}
            console.print(f"P/D: prefill pods {', '.join(prefill_pods)}; decode pods behind pd-sidecars "
                          + ", ".join(f"{c} → {u}" for c, u in cars.items()))
        config = "batch-interactive" if args.batch and args.config == "default" else args.config
        if args.pd and args.config == "default":
            config = "pd"
        batch_port = free_port() if args.batch else 0
        envoy_args = {"batch": f"127.0.0.1:{batch_port}"} if args.batch else {}
        replicas = max(1, int(getattr(args, "replicas", 1)))
        kill_replica = bool(getattr(args, "kill_replica", False))
        if kill_replica and replicas < 2:
            raise SystemExit("extproc demo: --kill-replica needs --replicas >= 2")
        spec = StackSpec(endpoints=routed, config=config, labels=labels, kv_events=info.get("kv_events") if args.kv_events else None,
                         models=[DEMO_MODEL], scheduler_args=["--seed", str(args.seed)], envoy_args=envoy_args, replicas=replicas,
                         failure_mode=getattr(args, "failure_mode", "fail-close"))  # fmt: skip
        if replicas > 1:
            console.print(f"active-active: {replicas} scheduler replicas behind Envoy's ext_proc cluster, state shared through Redis"
                          + (" — the last one is SIGKILLed halfway" if kill_replica else ""))
        replica_rep: dict[str, Any] = {"count": replicas, "killed": None}
        async with Stack(spec) as st, contextlib.AsyncExitStack() as bstack:
            batch_srv = None
            if args.batch:
                store = tempfile.mkdtemp(prefix="extproc-demo-batch-")
                batch_srv = await BatchServerProcess.start(st.url, store, port=batch_port)
                bstack.push_async_callback(batch_srv.stop)
                console.print(f"batch service on :{batch_port} behind Envoy (/v1/files, /v1/batches), store {store}")
            assert st.metrics_url is not None
            await wait_for_scrapes(st.metrics_url, len(routed))
            before = await scrape_pod_counters(endpoints)
            wl = build_workload(args.requests, args.seed)
            results: list[Result] = []
            sem = asyncio.Semaphore(args.concurrency)
            conn = aiohttp.TCPConnector(limit=args.concurrency * 2)
            t_start = time.perf_counter()
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
                batch_id = await batch_submit(session, st.url, batch_input(args.batch_lines, args.seed)) if args.batch else ""
                with Progress(TextColumn("[bold blue]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as prog:
                    task = prog.add_task("send", total=len(wl.items))

                    hdrs = {"x-gateway-inference-objective": "interactive"} if args.batch else None

                    kill_task: list[asyncio.Task[None]] = []

                    async def kill_last() -> None:
                        victim = replicas - 1
                        replica_rep["killed_at_monotonic"] = time.monotonic()
                        await st.kill_replica(victim)
                        replica_rep["killed"] = victim
                        replica_rep["killed_after_requests"] = len(results)
                        console.print(f"[bold red]SIGKILL[/] scheduler replica {victim} after {len(results)} requests")

                    async def one(path: str, body: dict[str, Any], kind: str) -> None:
                        async with sem:
                            results.append(await send(session, st.url, path, body, kind, hdrs))
                        prog.advance(task)
                        if kill_replica and not kill_task and len(results) >= len(wl.items) // 2:
                            kill_task.append(asyncio.ensure_future(kill_last()))

                    await asyncio.gather(*(one(*it) for it in wl.items))
                    if kill_task:
                        await kill_task[0]
                wall = time.perf_counter() - t_start
                checks = await error_checks(session, st.url)
                if args.pd:
                    checks["spoofed_prefiller"] = await pd_spoof_check(session, st.url)
                batch_rep: dict[str, Any] | None = None
                if args.batch:
                    b = await batch_wait(session, st.url, batch_id)
                    rc = b.get("request_counts", {})
                    batch_rep = {
                        "id": batch_id, "status": b.get("status"), "total": rc.get("total", 0), "completed": rc.get("completed", 0),
                        "failed": rc.get("failed", 0), "wall_s": round(time.perf_counter() - t_start, 3),
                        "each_custom_id_once": await batch_output_check(session, st.url, b, args.batch_lines),
                    }  # fmt: skip
                async with session.get(st.metrics_url + "/metrics") as r:
                    sched_metrics = await r.text()
                if kill_replica:  # the survivors drop the dead replica's load (peer TTL): wait for it, up to 5 s
                    t_end = time.monotonic() + 5.0
                    while time.monotonic() < t_end:
                        views = []
                        for u in st.metrics_urls:
                            async with session.get(u + "/debug/replication") as r:
                                views.append(await r.json())
                        if all(len(v.get("peers") or {}) == replicas - 2 for v in views):
                            drops = [v.get("last_peer_drop_monotonic", 0.0) for v in views]
                            replica_rep["dead_replica_dropped_after_ms"] = round((max(drops) - replica_rep["killed_at_monotonic"]) * 1000, 1)
                            break
                        await asyncio.sleep(0.05)
                if replicas > 1 and st.envoy is not None:
                    # requests whose first decision failed (replica died mid-decision) and were decided again
                    replica_rep["decision_retries"] = await envoy_counter(
                        session, st.envoy.admin_url, "cluster.extproc_decision_retry.upstream_rq_total")
                if replicas > 1:
                    reps = []
                    for u in st.metrics_urls:
                        async with session.get(u + "/debug/replication") as r:
                            d = await r.json()
                        reps.append({k: d.get(k) for k in ("replica_id", "connected", "peers", "sent", "received", "dropped_peers", "access_log")})
                    replica_rep["live"] = reps
            after = await scrape_pod_counters(endpoints)
    finally:
        if sidecar_proc is not None:
            await stop_process(sidecar_proc)
        await stop_process(sim)

    ok = [r for r in results if r.status == 200]
    failed = [r for r in results if r.status != 200]
    per_pod = Counter(r.served for r in ok)
    # in P/D the pick is the decode pod's sidecar, which shares the pod with the decode vLLM that serves
    served_as_picked = sum(1 for r in ok if r.picked and cars.get(r.picked, r.picked) == r.served)
    # fail-open with a replica SIGKILLed mid-run: a request whose ext_proc stream was open on the dead replica is
    # sent by Envoy to the fallback cluster (no pick header): served, but not by a scheduler decision. Counted apart
    # (and only allowed in that run); a request with a pick served elsewhere is still a failure.
    fell_back = (
        sum(1 for r in ok if not r.picked)
        if replica_rep.get("killed") is not None and getattr(args, "failure_mode", "fail-close") == "fail-open"
        else 0
    )
    hits = sum(after[e]["prefix_cache_hits"] - before[e]["prefix_cache_hits"] for e in endpoints)
    queries = sum(after[e]["prefix_cache_queries"] - before[e]["prefix_cache_queries"] for e in endpoints)
    stream_ttft = [r.ttft_ms for r in ok if "stream" in r.kind]
    report: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "served_as_picked": served_as_picked,
        "fell_back": fell_back,
        "per_pod": {e: per_pod.get(e, 0) for e in endpoints},
        "per_kind": dict(Counter(r.kind for r in results)),
        "config": config,
        "pods": len(endpoints),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 1) if wall else 0.0,
        "ttft_ms": {"p50": round(_pct(stream_ttft, 0.5), 2), "p90": round(_pct(stream_ttft, 0.9), 2)},
        "e2e_ms": {"p50": round(_pct([r.e2e_ms for r in ok], 0.5), 2), "p90": round(_pct([r.e2e_ms for r in ok], 0.9), 2)},
        "output_tokens": sum(r.output_tokens for r in ok),
        "prefix_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "scheduler_decision_us": {
            "p50_bucket_le": (_histogram_quantile(sched_metrics, "extproc_scheduling_latency_seconds", 0.5) or 0) * 1e6,
            "p99_bucket_le": (_histogram_quantile(sched_metrics, "extproc_scheduling_latency_seconds", 0.99) or 0) * 1e6,
        },
        "error_checks": checks,
        "replicas": replica_rep,
        **({"batch": batch_rep} if batch_rep is not None else {}),
        **({"pd": {
            "prefill_pods": [e for e in endpoints if labels.get(e, {}).get("llm-d.ai/role") == "prefill"],
            "sidecars": cars,
            "split": sum(1 for r in ok if r.prefill),
            "prefilled_locally": sum(1 for r in ok if not r.prefill),
            "per_prefill_pod": dict(Counter(r.prefill for r in ok if r.prefill)),
            "per_request": [{"kind": r.kind, "status": r.status, "decode_pod": r.served, "prefill_pod": r.prefill or None}
                            for r in results],
        }} if args.pd else {}),
        "failures": [{"kind": r.kind, "status": r.status, "error": r.error[:200]} for r in failed[:20]],
        "not_served_as_picked": [{"kind": r.kind, "picked": r.picked, "served": r.served} for r in ok
                                 if not (r.picked and cars.get(r.picked, r.picked) == r.served)][:20],
    }
    _print_summary(console, report)
    return report


def _print_summary(console: Any, rep: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"extproc demo — {rep['pods']} pods, profile '{rep['config']}'", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("requests", "ok", "failed", "served_as_picked", "requests_per_s", "output_tokens", "prefix_hit_rate"):
        t.add_row(k, str(rep[k]))
    t.add_row("TTFT p50 / p90 (ms, streams)", f"{rep['ttft_ms']['p50']} / {rep['ttft_ms']['p90']}")
    t.add_row("E2E p50 / p90 (ms)", f"{rep['e2e_ms']['p50']} / {rep['e2e_ms']['p90']}")
    d = rep["scheduler_decision_us"]
    t.add_row("decision latency p50 / p99 (µs, bucket ≤)", f"{d['p50_bucket_le']:.0f} / {d['p99_bucket_le']:.0f}")
    r = rep.get("replicas") or {}
    if r.get("count", 1) > 1:
        if rep.get("fell_back"):
            t.add_row("fell back (fail-open, stream on the killed replica)", str(rep["fell_back"]))
        t.add_row("scheduler replicas (killed)", f"{r['count']} ({'replica ' + str(r['killed']) if r.get('killed') is not None else 'none'})")
        t.add_row("decided again (decision retry)", str(r.get("decision_retries")))
    console.print(t)
    p = Table(title="requests per pod", show_header=True)
    p.add_column("pod")
    p.add_column("served", justify="right")
    for ep, n in rep["per_pod"].items():
        p.add_row(ep, str(n))
    console.print(p)
    c = Table(title="bad input and routing checks", show_header=True)
    c.add_column("case")
    c.add_column("status", justify="right")
    c.add_column("expected", justify="right")
    c.add_column("ok")
    for name, v in rep["error_checks"].items():
        c.add_row(name, str(v["status"]), str(v["expected"]), "✔" if v["ok"] else "✘")
    console.print(c)
    if "pd" in rep:
        pd = rep["pd"]
        console.print(f"P/D: {pd['split']} requests prefilled on a prefill pod {pd['per_prefill_pod']}, "
                      f"{pd['prefilled_locally']} on their decode pod (prefix mostly cached there)")
    if "batch" in rep:
        b = rep["batch"]
        console.print(f"batch job {b['id']}: {b['status']}, {b['completed']}/{b['total']} completed, {b['failed']} failed, each custom_id once: {b['each_custom_id_once']}")
    verdict = _passed(rep)
    console.print("[bold green]PASS[/]: every request served by the pod the scheduler picked" if verdict else "[bold red]FAIL[/]: see the tables above")


def run(args: argparse.Namespace) -> int:
    from extproc.observe.logging import setup_logging

    setup_logging("warning", "text")
    try:
        import uvloop

        rep = uvloop.run(run_demo(args))
    except ImportError:
        rep = asyncio.run(run_demo(args))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2)
    return 0 if _passed(rep) else 1


def _passed(rep: dict[str, Any]) -> bool:
    picked_or_fallback = rep["served_as_picked"] + rep.get("fell_back", 0)
    ok = rep["ok"] == rep["requests"] and picked_or_fallback == rep["ok"] and all(v["ok"] for v in rep["error_checks"].values())
    b = rep.get("batch")
    return ok and (b is None or (b["status"] == "completed" and b["completed"] == b["total"] and b["each_custom_id_once"]))
