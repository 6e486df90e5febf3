"""Virtual-time benchmark: a discrete-event loop in which the SAME scheduler plugins drive the simulator's pure
engine model (``extproc.sim.engine.Engine``), with no sockets and no sleeps.

Per pod, the loop runs engine steps back to back while the engine has work (a step's tokens exist at its end);
every ``scrape_interval`` virtual seconds it refreshes each ``Endpoint.metrics`` from the engine (waiting,
running, KV use, LoRA state, prefix counters), as the real scraper does from ``/metrics``. The router side keeps
``inflight`` counts like the ext_proc server, calls ``schedule`` → ``dispatched`` at arrival and ``completed``
with an ``Observation`` at the end. Network and proxy latency are zero: TTFT is queueing + prefill on the pod.

Envoy-only setups are modelled in-process: ROUND_ROBIN cycles the pods; LEAST_REQUEST is Envoy's default
power-of-two-choices over active requests. Peer routers (own Rust proxies) cannot run in virtual time.
KV events, when a config needs them, are handed to the KV-event index in-process at the end of the step that
produced them (vLLM publishes a step's events once the step returns); the index's speculative TTLs and
in-flight holds run on virtual time.

P/D setups (``SetupSpec.pd``) split the fleet into prefill- and decode-role pods (``llm-d.ai/role`` labels). A
request the scheduler splits (``x-prefiller-host-port`` in the result's headers) runs as the decode-side sidecar
runs it: a prefill leg (``max_tokens`` 1) on the prefill pod; when it finishes, the decode leg on the decode pod
with the prompt's KV arriving after the transfer time of ``extproc.sim.kvtransfer`` (only the blocks the decode
pod's prefix cache lacks are moved), failing with the fleet's failure rate and policy. Both legs count in the
pods' in-flight accounting; the client's TTFT is the decode pod's first token.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.api import parse_request
from extproc.bench.report import RequestResult, SetupRun
from extproc.bench.setups import SetupSpec, config_available
from extproc.bench.workloads import MODEL, Workload
from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics
from extproc.predictor.features import observe_chunk, set_clock
from extproc.scheduling.framework import Observation, SchedulingError

log = logging.getLogger(__name__)

PREFILL_HEADER = "x-prefiller-host-port"
PREFILL_SUFFIX = ":prefill"

_ARRIVAL = 0
_STEP_END = 1
_SCRAPE = 2


@dataclass(slots=True)
class FleetLayout:
    """Pods of a fleet: (profile name, address) in order."""

    pods: list[tuple[str, str]]
    kv_blocks: int | None = None
    loras: tuple[str, ...] = ()
    time_scale: float = 1.0  # as the real fleet's --time-scale (to compare with a real-time run)
    roles: tuple[str, ...] = ()  # P/D: llm-d.ai/role per pod ("" = aggregated fleet)
    link: str = "rdma-400g"
    kv_failure_rate: float = 0.0
    kv_load_failure_policy: str = "fail"

    @property
    def labels(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for i, (prof, addr) in enumerate(self.pods):
            lab = {"pod-class": prof}
            if self.roles:
                lab["llm-d.ai/role"] = self.roles[i]
            out[addr] = lab
        return out

    def split(self, prefill: int) -> "FleetLayout":
        """The same pods, the first ``prefill`` of them prefill-role, the rest decode-role (0 = half)."""
        n = len(self.pods)
        k = prefill if prefill > 0 else n // 2
        if not 0 < k < n:
            raise ValueError(f"a P/D split needs 1..{n - 1} prefill pods, got {k}")
        return FleetLayout(self.pods, self.kv_blocks, self.loras, self.time_scale, tuple(["prefill"] * k + ["decode"] * (n - k)),
                           self.link, self.kv_failure_rate, self.kv_load_failure_policy)


def layout(
    fleet: str,
    kv_blocks: int | None = None,
    loras: tuple[str, ...] = (),
    time_scale: float = 1.0,
    link: str = "rdma-400g",
    kv_failure_rate: float = 0.0,
    kv_load_failure_policy: str = "fail",
) -> FleetLayout:
    """``fleet``: ``N`` (N pods of llama3-8b-h100) or ``profile:N,profile:M``."""
    from extproc.sim.profiles import parse_fleet

    spec = f"llama3-8b-h100:{int(fleet)}" if fleet.strip().isdigit() else fleet
    pods: list[tuple[str, str]] = []
    for prof, n in parse_fleet(spec):
        for _ in range(n):
            i = len(pods)
            pods.append((prof, f"10.{i // 250}.{i % 250}.1:8000"))
    from extproc.sim.kvtransfer import FAILURE_POLICIES, get_link

    get_link(link)
    if not 0.0 <= kv_failure_rate <= 1.0 or kv_load_failure_policy not in FAILURE_POLICIES:
        raise ValueError("kv_failure_rate must be within [0, 1] and kv_load_failure_policy fail|recompute")
    return FleetLayout(pods, kv_blocks, loras, time_scale, (), link, kv_failure_rate, kv_load_failure_policy)


@dataclass(slots=True)
class _Live:
    """A request in flight on a virtual pod."""

    wr_index: int
    stage: int
    arrival: float
    prompt_tokens: int
    max_tokens: int
    endpoint: Endpoint
    request: Any  # InferenceRequest
    obs: Observation
    first: float = 0.0
    out_tokens: int = 0
    ids: list[int] | None = None
    prefill_ep: Endpoint | None = None  # P/D: the prefill leg's pod
    lora: str | None = None


@dataclass(slots=True)
class _Pod:
    endpoint: Endpoint
    engine: Any  # extproc.sim.engine.Engine
    stepping: bool = False
    pending: Any = None  # StepResult of the step in progress
    token: int = 0  # bumps on every step start: an idle wait cut short by an arrival leaves a stale STEP_END


@dataclass(slots=True)
class VirtualResult:
    results: list[RequestResult]
    prefix: list[tuple[float, float] | None]
    virtual_seconds: float
    wall_seconds: float
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


class _EnvoyLB:
    """Envoy's ROUND_ROBIN and LEAST_REQUEST (choice_count 2, active requests) over all pods."""

    def __init__(self, policy: str, endpoints: list[Endpoint], seed: int) -> None:
        self.policy = policy
        self.endpoints = endpoints
        self.rng = random.Random(seed)
        self.next = 0

    def pick(self) -> Endpoint:
        eps = self.endpoints
        if self.policy == "ROUND_ROBIN":
            ep = eps[self.next % len(eps)]
            self.next += 1
            return ep
        if len(eps) == 1:
            return eps[0]
        a, b = self.rng.sample(eps, 2)
        return a if a.inflight <= b.inflight else b


def _feed_kv_events(plugins: dict[str, Any], clock: Callable[[], float]) -> Callable[[str, list[Any]], None] | None:
    """A callable(address, engine events) that hands engine KV events to the config's KV-block index, through
    the same wire format the pods publish (msgpack batch → ``decode_payload``), or None if no plugin has one.
    The index's clock becomes ``clock`` (virtual time), so speculative-entry TTLs expire in virtual seconds."""
    from extproc.datalayer.kvevents import decode_payload
    from extproc.datalayer.kvindex import KVBlockIndex
    from extproc.sim.kvevents import encode_batch

    index = next((p.index for p in plugins.values() if isinstance(getattr(p, "index", None), KVBlockIndex)), None)
    if index is None:
        return None
    index.clock = clock

    def feed(address: str, events: list[Any]) -> None:
        index.apply(address, decode_payload(encode_batch(events, 0.0)).events)

    return feed


def run_virtual(
    workload: Workload,
    setup: SetupSpec,
    fleet: FleetLayout,
    *,
    seed: int = 0,
    scrape_interval: float = 0.05,
    progress: Callable[[int], None] | None = None,
) -> VirtualResult:
    """Replay ``workload`` through ``setup`` on a virtual fleet. Deterministic for a given seed."""
    from extproc.sim.engine import Engine, SimRequest
    from extproc.sim.profiles import get_profile
    from extproc.sim.tokenizer import get_tokenizer

    wall0 = time.perf_counter()
    tok = get_tokenizer()
    from extproc.sim.kvtransfer import get_link, transfer_seconds

    link = get_link(fleet.link)
    kv_rng = random.Random(f"kv:{seed}")
    pool = EndpointPool(default_models=frozenset((MODEL, *fleet.loras)))
    pool.set_endpoints([a for _, a in fleet.pods], fleet.labels)
    endpoints = list(pool.snapshot())
    pods: dict[str, _Pod] = {}
    for i, ((prof_name, addr), ep) in enumerate(zip(fleet.pods, endpoints)):
        prof = get_profile(prof_name)
        if fleet.kv_blocks:
            prof = prof.replace(num_gpu_blocks=fleet.kv_blocks)
        pods[addr] = _Pod(ep, Engine(prof, seed=seed * 7919 + i, time_scale=fleet.time_scale, record_kv_events=setup.kv_events))

    scheduler = None
    envoy: _EnvoyLB | None = None
    kv_feed: Callable[[str, list[Any]], None] | None = None
    if setup.kind == "envoy":
        envoy = _EnvoyLB(setup.lb_policy or "ROUND_ROBIN", endpoints, seed)
    elif setup.kind == "extproc":
        from extproc.scheduling.config import load_config

        assert setup.config is not None
        cfg = load_config(setup.config, pool)
        scheduler = cfg.scheduler
        scheduler.rng.seed(seed)
        for i, plugin in enumerate(cfg.plugins.values()):  # pickers' tie-breaks: same seed → same picks
            rng = getattr(plugin, "rng", None)
            if isinstance(rng, random.Random):
                rng.seed(seed * 1009 + i)
        if setup.kv_events:
            kv_feed = _feed_kv_events(cfg.plugins, lambda: now)
            if kv_feed is None:
                raise ValueError(f"config {setup.config!r} has no KV-block index to feed events to")
    else:
        raise ValueError(f"setup {setup.name} ({setup.kind}) cannot run in virtual time")
    random.seed(seed)  # plugins that use the module RNG (tie-breaks) stay deterministic

    def scrape(now_mono: float) -> None:
        for pod in pods.values():
            e = pod.engine
            st = e.stats
            prof = e.profile
            pod.endpoint.metrics = PodMetrics(
                waiting=e.num_waiting,
                running=e.num_running,
                kv_usage=e.kv_usage,
                running_loras=frozenset(e.running_loras),
                waiting_loras=frozenset(e.waiting_loras),
                max_loras=prof.max_loras,
                block_size=prof.block_size,
                num_gpu_blocks=prof.num_gpu_blocks,
                prefix_cache_queries=float(st.prefix_cache_queries),
                prefix_cache_hits=float(st.prefix_cache_hits),
                updated_at=now_mono,
            )

    def counters() -> tuple[float, float]:
        h = q = 0.0
        for pod in pods.values():
            h += pod.engine.stats.prefix_cache_hits
            q += pod.engine.stats.prefix_cache_queries
        return h, q

    events: list[tuple[float, int, int, Any]] = []
    seq = 0
    for i, wr in enumerate(workload.requests):
        events.append((wr.arrival, seq, _ARRIVAL, i))
        seq += 1
    heapq.heapify(events)
    heapq.heappush(events, (0.0, seq, _SCRAPE, None))
    seq += 1

    bounds = [b for _, b in workload.stage_bounds()]
    stage_marks: list[tuple[float, float]] = [counters()]
    live: dict[str, _Live] = {}
    prefill_legs: dict[str, _Live] = {}  # P/D: prefill-leg request id → the request
    results: list[RequestResult | None] = [None] * len(workload.requests)
    remaining = len(workload.requests)
    done = 0
    steps = 0
    now = 0.0
    next_bound = 0

    def finish_failed(wr_index: int, stage: int, at: float, status: int, error: str) -> None:
        nonlocal remaining, done
        results[wr_index] = RequestResult(wr_index, stage, at, False, status=status, error=error)
        remaining -= 1
        done += 1

    def start_step(pod: _Pod, at: float) -> None:
        nonlocal seq, steps
        res = pod.engine.step(at)
        steps += 1
        pod.stepping = True
        pod.pending = res
        pod.token += 1
        heapq.heappush(events, (at + res.duration_s, seq, _STEP_END, (pod, pod.token)))
        seq += 1

    def kick(pod: _Pod, at: float) -> None:
        """New work on ``pod``: start a step now unless one is running (an idle wait for a KV transfer is cut)."""
        if not pod.stepping:
            start_step(pod, at)
        elif pod.pending is not None and pod.pending.idle:
            res = pod.pending
            pod.stepping = False
            pod.pending = None
            deliver(pod, res)
            start_step(pod, at)

    def start_decode_leg(lv: _Live, block_ids: list[int], at: float) -> None:
        """The sidecar's decode leg: the prompt's KV comes from the prefill pod over ``link``."""
        pod = pods[lv.endpoint.address]
        eng = pod.engine
        ids = lv.ids or []
        tokens = min(len(block_ids) * eng.profile.block_size, max(len(ids) - 1, 0))
        local = eng.cached_prefix_tokens(ids, lv.lora)
        prof = eng.profile
        secs = transfer_seconds(tokens - local, prof.kv_bytes_per_token // prof.tensor_parallel, link) * fleet.time_scale
        failed = fleet.kv_failure_rate > 0 and kv_rng.random() < fleet.kv_failure_rate
        eng.add_request(SimRequest(lv.request.request_id, ids, lv.max_tokens, lora=lv.lora, arrival=at, remote_tokens=tokens,
                                   ready_at=at + secs, remote_failed=failed, failure_policy=fleet.kv_load_failure_policy))
        kick(pod, at)

    def deliver(pod: _Pod, res: Any) -> None:
        """Hand a finished step's outputs to the requests (and the KV-event index)."""
        nonlocal remaining, done
        if kv_feed is not None and res.kv_events:
            # vLLM records a step's KV events while scheduling it and publishes them once the step returns
            kv_feed(pod.endpoint.address, res.kv_events)
        for out in res.outputs:
            leg = prefill_legs.get(out.request_id)
            if leg is not None:  # P/D prefill leg: its one token is the sidecar's signal to start the decode leg
                if out.finished:
                    del prefill_legs[out.request_id]
                    pep = leg.prefill_ep
                    assert pep is not None
                    pep.inflight -= 1
                    pep.inflight_prefill_tokens -= leg.prompt_tokens
                    start_decode_leg(leg, out.block_ids or [], now)
                continue
            lv = live.get(out.request_id)
            if lv is None:
                continue
            ep = lv.endpoint
            if out.finish_reason == "error":  # a failed KV transfer with kv_load_failure_policy=fail
                del live[out.request_id]
                ep.inflight -= 1
                ep.inflight_prefill_tokens -= lv.prompt_tokens
                lv.obs.complete_ts = now
                lv.obs.status = 500
                lv.obs.error = "kv_transfer_failed"
                if scheduler is not None:
                    scheduler.completed(lv.request, lv.obs)
                finish_failed(lv.wr_index, lv.stage, lv.arrival, 500, "kv_transfer_failed: KV load from the prefill pod failed")
                continue
            if out.first_token:
                lv.first = now
                lv.obs.first_token_ts = now
                ep.inflight_prefill_tokens -= lv.prompt_tokens
                ep.inflight_decode_tokens += lv.max_tokens
            lv.out_tokens = out.num_output_tokens
            if out.finished:
                del live[out.request_id]
                ep.inflight -= 1
                ep.inflight_decode_tokens -= lv.max_tokens
                lv.obs.complete_ts = now
                lv.obs.output_tokens = lv.out_tokens
                lv.obs.status = 200
                if scheduler is not None:
                    scheduler.completed(lv.request, lv.obs)
                results[lv.wr_index] = RequestResult(
                    lv.wr_index,
                    lv.stage,
                    lv.arrival,
                    True,
                    status=200,
                    ttft_ms=(lv.first - lv.arrival) * 1000.0,
                    e2e_ms=(now - lv.arrival) * 1000.0,
                    output_tokens=lv.out_tokens,
                    pod=ep.address,
                    prefill_pod=lv.prefill_ep.address if lv.prefill_ep is not None else "",
                )
                remaining -= 1
                done += 1
                if progress is not None and done % 100 == 0:
                    progress(100)

    # the predictor's step-phase features read "now" and each pod's last chunk time: give them virtual time
    prev_clock = set_clock(lambda: now)
    try:
        while events and remaining > 0:
            now, _, kind, data = heapq.heappop(events)
            while next_bound < len(bounds) - 1 and now >= bounds[next_bound]:
                stage_marks.append(counters())
                next_bound += 1
            if kind == _ARRIVAL:
                wr = workload.requests[data]
                raw = wr.body_bytes(stream=True)
                req = parse_request(wr.path, raw, wr.headers(), request_id=f"bench-{wr.index}")
                if wr.api == "chat":
                    ids = tok.encode_chat([{"role": r, "content": c} for r, c in wr.messages])
                else:
                    ids = tok.encode(wr.prompt())
                req.prompt_token_ids = ids if setup.kv_events else None
                cycle = None
                result = None
                try:
                    if envoy is not None:
                        ep = envoy.pick()
                    else:
                        assert scheduler is not None
                        result, cycle = scheduler.schedule(req)
                        ep = result.primary
                except SchedulingError as e:
                    finish_failed(wr.index, wr.stage, now, e.status, e.message)
                    continue
                pod = pods[ep.address]
                lora = wr.model if wr.model in fleet.loras else None
                pep: Endpoint | None = None
                if result is not None:
                    phost = getattr(result, "headers", {}).get(PREFILL_HEADER)
                    if phost:
                        pep = pool.get(phost)
                try:
                    if pep is not None:
                        pods[pep.address].engine.add_request(
                            SimRequest(req.request_id + PREFILL_SUFFIX, ids, 1, lora=lora, arrival=now, remote_decode=True)
                        )
                    else:
                        pod.engine.add_request(SimRequest(req.request_id, ids, wr.max_tokens, lora=lora, arrival=now))
                except ValueError as e:
                    finish_failed(wr.index, wr.stage, now, 400, str(e))
                    continue
                if scheduler is not None and result is not None and cycle is not None:
                    scheduler.dispatched(cycle, req, result)
                ep.inflight += 1
                ep.inflight_prefill_tokens += len(ids)
                obs = Observation(req.request_id, ep.address, wr.model, len(ids), dispatch_ts=now)
                lv = _Live(wr.index, wr.stage, now, len(ids), wr.max_tokens, ep, req, obs, ids=ids, prefill_ep=pep, lora=lora)
                live[req.request_id] = lv
                if pep is not None:
                    pep.inflight += 1
                    pep.inflight_prefill_tokens += len(ids)
                    prefill_legs[req.request_id + PREFILL_SUFFIX] = lv
                    kick(pods[pep.address], now)
                else:
                    kick(pod, now)
            elif kind == _STEP_END:
                pod, token = data
                if token != pod.token or not pod.stepping:
                    continue  # an idle wait that an arrival cut short
                res = pod.pending
                pod.stepping = False
                pod.pending = None
                deliver(pod, res)
                if pod.engine.has_work():
                    start_step(pod, now)
            else:  # scrape
                scrape(time.monotonic())
                heapq.heappush(events, (now + scrape_interval, seq, _SCRAPE, None))
                seq += 1
    finally:
        set_clock(prev_clock)
    while len(stage_marks) < len(bounds):
        stage_marks.append(counters())
    stage_marks.append(counters())
    prefix: list[tuple[float, float] | None] = []
    for i in range(len(bounds)):
        h0, q0 = stage_marks[i]
        h1, q1 = stage_marks[i + 1]
        prefix.append((h1 - h0, q1 - q0))
    if progress is not None and done % 100:
        progress(done % 100)
    out = [r for r in results if r is not None]
    return VirtualResult(out, prefix, now, time.perf_counter() - wall0, steps)


def virtual_availability(setup: SetupSpec) -> str | None:
    if setup.kind == "peer":
        return "peer routers are their own Rust proxies and cannot run in virtual time (run without --virtual)"
    if setup.kind == "extproc" and setup.config:
        return config_available(setup.config)
    return None


def run_setups(
    workload: Workload,
    setups: list[SetupSpec],
    fleet: FleetLayout,
    *,
    seed: int = 0,
    show_progress: bool = True,
    pd_prefill: int = 0,
) -> list[SetupRun]:
    """Run every setup on a fresh virtual fleet (cold caches) with the same trace. P/D setups get the same pods
    split into ``pd_prefill`` prefill pods (0 = half) and decode pods."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runs: list[SetupRun] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress
    ) as prog:
        for s in setups:
            why = virtual_availability(s)
            if why:
                log.warning("setup skipped", extra={"setup": s.name, "reason": why})
                runs.append(SetupRun(s.name, "skipped", why))
                continue
            task = prog.add_task(f"[virtual] {s.name}", total=len(workload.requests))
            try:
                fl = fleet.split(pd_prefill) if s.pd else fleet
                vr = run_virtual(workload, s, fl, seed=seed, progress=lambda n, t=task: prog.advance(t, n))
            except Exception as e:  # one broken setup must not lose the others' results
                log.exception("virtual setup failed", extra={"setup": s.name})
                runs.append(SetupRun(s.name, "failed", f"{type(e).__name__}: {e}"))
                continue
            cfg: dict[str, Any] = {"kind": s.kind, "mode": "virtual", "virtual_seconds": round(vr.virtual_seconds, 3),
                                   "wall_seconds": round(vr.wall_seconds, 3), "engine_steps": vr.steps}
            if s.kind == "envoy":
                cfg["lb_policy"] = s.lb_policy
                cfg["model"] = "in-process model of Envoy's load balancer"
            else:
                cfg["config"] = s.config
            if s.pd:
                cfg.update(pd_roles={a: r for (_, a), r in zip(fl.pods, fl.roles)}, link=fl.link,
                           kv_failure_rate=fl.kv_failure_rate, kv_load_failure_policy=fl.kv_load_failure_policy)
                cfg["prefill_pods"] = sum(1 for r in fl.roles if r == "prefill")
                cfg["split_requests"] = sum(1 for r in vr.results if r.prefill_pod)
            runs.append(SetupRun(s.name, "ok", config=cfg, results=vr.results, prefix=vr.prefix))
    return runs
