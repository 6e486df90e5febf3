"""Virtual-time benchmark: a discrete-event loop in which the SAME scheduler plugins drive the simulator's pure
engine model (``extproc.sim.engine.Engine``), with no sockets and no sleeps.

Per pod, the loop runs engine steps back to back while the engine has work (a step's tokens exist at its end);
every ``scrape_interval`` virtual seconds it refreshes each ``Endpoint.metrics`` from the engine (waiting,
running, KV use, LoRA state, prefix counters), as the real scraper does from ``/metrics``. The router side is
``_Gateway``: the server's decision and observation path minus the sockets — admission, ``schedule``, the
``FlightTracker`` (the server's in-flight accounting, on the virtual clock), body chunks per engine step through
``Flight.on_body_chunk``, ``finish`` → the scheduler's observers. A predictor config's trainer runs inline on the
virtual clock (same retrain schedule every run) and starts cold unless a warm-start file is given. Network and
proxy latency are zero: TTFT is queueing + prefill on the pod.

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
tracker's in-flight accounting (the prefill pod until its leg ends); the client's TTFT is the decode pod's first
token.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.api import parse_request
from extproc.contract import DEFAULT_SCRAPE_INTERVAL_S
from extproc.bench.report import RequestResult, SetupRun
from extproc.bench.setups import SetupSpec, config_available
from extproc.bench.workloads import MODEL, Workload
from extproc.datalayer.endpoint import Endpoint, EndpointPool
from extproc.predictor.features import set_clock
from extproc.scheduling.framework import Observation, SchedulingError
from extproc.server.decide import model_error, schedule_and_dispatch, shed_error
from extproc.server.tracker import Flight
from extproc.services import Services
from extproc.sim.vfleet import TICK, VirtualFleetLoop, VirtualPod, engine_metrics

log = logging.getLogger(__name__)

PREFILL_SUFFIX = ":prefill"


@dataclass(slots=True)
class FleetLayout:
    """Pods of a fleet: (profile name, address) in order."""

    pods: list[tuple[str, str]]
    kv_blocks: int | None = None
    loras: tuple[str, ...] = ()
    time_scale: float = 1.0  # as the real fleet's --time-scale (to compare with a real-time run)
    roles: tuple[str, ...] = ()  # P/D: llm-d.ai/role per pod (empty = aggregated fleet)
    link: str = "rdma-400g"
    kv_failure_rate: float = 0.0
    kv_load_failure_policy: str = "fail"

    @property
    def labels(self) -> dict[str, dict[str, str]]:
        from extproc.sim.profiles import get_profile

        # what a real pod exposes (its accelerator, its role label), never the simulator's profile name
        out: dict[str, dict[str, str]] = {}
        for i, (prof, addr) in enumerate(self.pods):
            lab = {"accelerator": get_profile(prof).accelerator}
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
    """A request in flight on a virtual pod: the bench's view (arrival, stage) plus the server's ``Flight``."""

    wr_index: int
    stage: int
    arrival: float
    flight: Flight
    first: float = 0.0
    out_tokens: int = 0
    ids: list[int] | None = None
    max_tokens: int = 0
    lora: str | None = None
    prefill_pod: str = ""  # P/D: the pod that ran (or runs) the prefill leg


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


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


_TOKEN_CHUNK = _sse({"choices": [{"index": 0, "text": "x"}]})


class _Gateway:
    """The server's request path minus the sockets, on virtual time.

    Decision side: the server's own steps (``extproc.server.decide``, which ``ExtProcHandler`` calls too) —
    unknown model → 404, admission (sheddable requests get 429 while the fleet is saturated, the same
    ``SaturationDetector`` and config), then ``schedule_and_dispatch``: ``Scheduler.schedule``, the tracker's
    ``dispatch`` with the chosen pod's predictor feature row, ``Scheduler.dispatched``. Response side (as the
    observation stream): response headers, one body chunk per engine step that produced tokens for a stream
    (``Flight.on_body_chunk``: first-token time, the step-phase features, chunk count), the usage block and
    ``[DONE]`` (or, non-streaming, the whole body at the end), then ``FlightTracker.finish`` → the scheduler's
    observers (prefix index, latency predictor) — the production accounting, fed virtual timestamps. Envoy-only
    setups use the same tracker for in-flight counts (LEAST_REQUEST reads them)."""

    def __init__(self, setup: SetupSpec, pool: EndpointPool, endpoints: list[Endpoint], seed: int,
                 clock: Callable[[], float], warm_start: str | None) -> None:
        from extproc.scheduling.reservation import BATCH_RESERVATION
        from extproc.admission.saturation import SaturationDetector
        from extproc.predictor.service import RUNTIME_KEY, SERVICE_KEY, WARM_START_KEY, PredictorRuntime
        from extproc.server.tracker import FlightTracker

        self.scheduler: Any = None
        self.envoy: _EnvoyLB | None = None
        self.plugins: dict[str, Any] = {}
        self.saturation = SaturationDetector()
        self.reservation: Any = None  # batch-reserve-filter's pods kept free of batch work
        self.predictor: Any = None
        self.objectives: dict[str, int] = {}  # x-gateway-inference-objective -> priority, as the server maps it
        if setup.kind == "envoy":
            self.envoy = _EnvoyLB(setup.lb_policy or "ROUND_ROBIN", endpoints, seed)
        elif setup.kind == "extproc":
            from extproc.scheduling.config import load_config

            assert setup.config is not None
            services = Services({RUNTIME_KEY: PredictorRuntime(clock=clock), WARM_START_KEY: warm_start or ""})
            cfg = load_config(setup.config, pool, services)
            self.scheduler = cfg.scheduler
            self.scheduler.rng.seed(seed)
            self.plugins = cfg.plugins
            for i, plugin in enumerate(cfg.plugins.values()):  # pickers' tie-breaks: same seed → same picks
                rng = getattr(plugin, "rng", None)
                if isinstance(rng, random.Random):
                    rng.seed(seed * 1009 + i)
            self.saturation = SaturationDetector.from_config(cfg.saturation)
            self.objectives = dict(cfg.objectives)
            self.predictor = services.get(SERVICE_KEY)
            self.reservation = services.get(BATCH_RESERVATION)
            if self.predictor is not None:
                self.predictor.start_sync()
        else:
            raise ValueError(f"setup {setup.name} ({setup.kind}) cannot run in virtual time")
        self.pool = pool
        self.tracker = FlightTracker(self._completed, clock=clock)

    def _completed(self, request: Any, obs: Observation) -> None:
        if self.scheduler is not None:
            self.scheduler.completed(request, obs)

    def decide(self, req: Any) -> Flight:
        """Admit, schedule and dispatch one parsed request; raises SchedulingError with the client's status.
        A P/D split leaves the prefill pod in ``flight.prefill_endpoint`` (accounted until its leg ends)."""
        if self.envoy is not None:
            return self.tracker.dispatch(req, self.envoy.pick())
        err = model_error(self.pool, req) or shed_error(self.pool, self.saturation, req, reservation=self.reservation)
        if err is not None:
            raise err
        flight, _, _ = schedule_and_dispatch(self.scheduler, self.tracker, self.pool, req)
        return flight

    @staticmethod
    def tokens(flight: Flight, now: float, first: bool) -> None:
        """The body chunk of one engine step that produced tokens for this request."""
        if first:
            flight.on_response_headers(200)
        if flight.request.stream:
            flight.on_body_chunk(_TOKEN_CHUNK, now)

    def finish(self, flight: Flight, now: float, out_tokens: int) -> None:
        usage = {"usage": {"completion_tokens": out_tokens}}
        if flight.request.stream:
            flight.on_body_chunk(_sse(usage) + b"data: [DONE]\n\n", now)
        else:
            flight.on_body_chunk(json.dumps(usage).encode(), now)
        self.tracker.finish(flight, "ok")

    def predictor_marks(self) -> tuple[int, int, int, int]:
        """(decisions, fallback decisions, retrains, samples) so far, to split the predictor's counters per stage."""
        p = self.predictor
        if p is None:
            return (0, 0, 0, 0)
        st = p.stats()
        return (int(st["predictions"]) + int(st["fallbacks"]), int(st["fallbacks"]), int(st["retrains"]), int(st["samples"]))

    def close(self) -> dict[str, Any] | None:
        """Stop the predictor; its report block (None when the config has no predictor)."""
        if self.predictor is None:
            return None
        rep = self.predictor.report()
        self.predictor.stop_sync()
        return rep  # type: ignore[no-any-return]


def run_virtual(
    workload: Workload,
    setup: SetupSpec,
    fleet: FleetLayout,
    *,
    seed: int = 0,
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL_S,
    progress: Callable[[int], None] | None = None,
    warm_start: str | None = None,
    stream: bool = True,
    token_cache: dict[int, list[int]] | None = None,
) -> VirtualResult:
    """Replay ``workload`` through ``setup`` on a virtual fleet. Deterministic for a given seed.

    ``warm_start``: a latency-model file for predictor configs (None: the predictor starts cold and learns
    online). ``stream``: send streaming requests (False: non-streaming, as most SDK calls and batch jobs).
    ``token_cache``: prompt token ids by request index, filled on first use and reused by later runs of the same
    workload (``extproc plan`` replays one trace for every candidate; the ids are never mutated)."""
    from extproc.sim.engine import Engine, SimRequest
    from extproc.sim.profiles import get_profile
    from extproc.datalayer.simtokenizer import get_tokenizer

    from extproc.sim.kvtransfer import get_link, transfer_seconds

    wall0 = time.perf_counter()
    tok = get_tokenizer()
    link = get_link(fleet.link)
    kv_rng = random.Random(f"kv:{seed}")
    pool = EndpointPool(default_models=frozenset((MODEL, *fleet.loras)))
    pool.set_endpoints([a for _, a in fleet.pods], fleet.labels)
    endpoints = list(pool.snapshot())
    pods: dict[str, VirtualPod] = {}
    for i, ((prof_name, addr), ep) in enumerate(zip(fleet.pods, endpoints)):
        prof = get_profile(prof_name)
        if fleet.kv_blocks:
            prof = prof.replace(num_gpu_blocks=fleet.kv_blocks)
        pods[addr] = VirtualPod(ep, Engine(prof, seed=seed * 7919 + i, time_scale=fleet.time_scale, record_kv_events=setup.kv_events))

    loop = VirtualFleetLoop(lambda pod, res, at: deliver(pod, res, at))
    clock: Callable[[], float] = lambda: loop.now  # noqa: E731
    gw = _Gateway(setup, pool, endpoints, seed, clock, warm_start)
    kv_feed: Callable[[str, list[Any]], None] | None = None
    if setup.kv_events:
        kv_feed = _feed_kv_events(gw.plugins, clock)
        if kv_feed is None:
            raise ValueError(f"config {setup.config!r} has no KV-block index to feed events to")
    random.seed(seed)  # plugins that use the module RNG (tie-breaks) stay deterministic

    def scrape(_: Any, now: float) -> None:
        """What the scraper does every ``scrape_interval``: each Endpoint's metrics from its engine."""
        now_mono = time.monotonic()
        for pod in pods.values():
            pod.endpoint.set_metrics(engine_metrics(pod.engine, now_mono))
        loop.push(now + scrape_interval, TICK)

    def counters() -> tuple[float, float]:
        h = q = 0.0
        for pod in pods.values():
            h += pod.engine.stats.prefix_cache_hits
            q += pod.engine.stats.prefix_cache_queries
        return h, q

    loop.add_arrivals(wr.arrival for wr in workload.requests)
    loop.push(0.0, TICK)

    bounds = [b for _, b in workload.stage_bounds()]
    stage_marks: list[tuple[float, float]] = [counters()]
    pred_marks: list[tuple[int, int, int, int]] = [gw.predictor_marks()]
    live: dict[str, _Live] = {}
    prefill_legs: dict[str, _Live] = {}  # P/D: prefill-leg request id → the request
    results: list[RequestResult | None] = [None] * len(workload.requests)
    remaining = len(workload.requests)
    done = 0
    next_bound = 0

    def finish_failed(wr_index: int, stage: int, at: float, status: int, error: str) -> None:
        nonlocal remaining, done
        results[wr_index] = RequestResult(wr_index, stage, at, False, status=status, error=error)
        remaining -= 1
        done += 1

    def start_decode_leg(lv: _Live, block_ids: list[int], at: float) -> None:
        """The sidecar's decode leg: the prompt's KV comes from the prefill pod over ``link``."""
        pod = pods[lv.flight.endpoint.address]
        eng = pod.engine
        ids = lv.ids or []
        prof = eng.profile
        tokens = min(len(block_ids) * prof.block_size, max(len(ids) - 1, 0))
        local = eng.cached_prefix_tokens(ids, lv.lora)
        secs = transfer_seconds(tokens - local, prof.kv_bytes_per_token // prof.tensor_parallel, link) * fleet.time_scale
        failed = fleet.kv_failure_rate > 0 and kv_rng.random() < fleet.kv_failure_rate
        eng.add_request(SimRequest(lv.flight.request.request_id, ids, lv.max_tokens, lora=lv.lora, arrival=at,
                                   remote_tokens=tokens, ready_at=at + secs, remote_failed=failed,
                                   failure_policy=fleet.kv_load_failure_policy))
        loop.kick(pod, at)

    def deliver(pod: VirtualPod, res: Any, now: float) -> None:
        """Hand a finished step's outputs to the requests (and its KV events to the index)."""
        nonlocal remaining, done
        if kv_feed is not None and res.kv_events:
            # vLLM records a step's KV events while scheduling it and publishes them once the step returns
            kv_feed(pod.endpoint.address, res.kv_events)
        for out in res.outputs:
            leg = prefill_legs.get(out.request_id)
            if leg is not None:  # P/D prefill leg: its one token is the sidecar's cue for the decode leg
                if out.finished:
                    del prefill_legs[out.request_id]
                    leg.flight.prefill_leg_done(now)  # x-pd-prefill-ms, as the sidecar reports it
                    start_decode_leg(leg, out.block_ids or [], now)
                continue
            lv = live.get(out.request_id)
            if lv is None:
                continue
            if out.finish_reason == "error":  # a failed KV transfer under kv_load_failure_policy=fail
                del live[out.request_id]
                lv.flight.on_response_headers(500)
                gw.tracker.finish(lv.flight, "status_500")
                finish_failed(lv.wr_index, lv.stage, lv.arrival, 500, "kv_transfer_failed: KV load from the prefill pod failed")
                continue
            if out.num_output_tokens > lv.out_tokens:
                first = out.first_token
                if first:
                    lv.first = now
                lv.out_tokens = out.num_output_tokens
                gw.tokens(lv.flight, now, first)
            if out.finished:
                del live[out.request_id]
                gw.finish(lv.flight, now, lv.out_tokens)
                ttft = lv.first if stream else now  # the client's first byte
                results[lv.wr_index] = RequestResult(
                    lv.wr_index,
                    lv.stage,
                    lv.arrival,
                    True,
                    status=200,
                    ttft_ms=(ttft - lv.arrival) * 1000.0,
                    e2e_ms=(now - lv.arrival) * 1000.0,
                    output_tokens=lv.out_tokens,
                    pod=lv.flight.endpoint.address,
                    prefill_pod=lv.prefill_pod,
                )
                remaining -= 1
                done += 1
                if progress is not None and done % 100 == 0:
                    progress(100)

    def mark_stages(now: float) -> None:
        nonlocal next_bound
        while next_bound < len(bounds) - 1 and now >= bounds[next_bound]:
            stage_marks.append(counters())
            pred_marks.append(gw.predictor_marks())
            next_bound += 1

    def arrive(index: int, now: float) -> None:
        wr = workload.requests[index]
        raw = wr.body_bytes(stream=stream)
        req = parse_request(wr.path, raw, wr.headers(), request_id=f"bench-{wr.index}", priority_of_objective=gw.objectives)
        cached = token_cache.get(wr.index) if token_cache is not None else None
        if cached is not None:
            ids = cached
        else:
            if wr.api == "chat":
                ids = tok.encode_chat([{"role": r, "content": c} for r, c in wr.messages])
            else:
                ids = tok.encode(wr.prompt())
            if token_cache is not None:
                token_cache[wr.index] = ids
        req.prompt_token_ids = ids if setup.kv_events else None
        try:
            flight = gw.decide(req)
        except SchedulingError as e:
            finish_failed(wr.index, wr.stage, now, e.status, e.message)
            return
        pod = pods[flight.endpoint.address]
        lora = wr.model if wr.model in fleet.loras else None
        pep = flight.prefill_endpoint
        target = pods[pep.address] if pep is not None else pod
        try:
            if pep is not None:  # P/D: the sidecar's prefill leg first
                target.engine.add_request(
                    SimRequest(req.request_id + PREFILL_SUFFIX, ids, 1, lora=lora, arrival=now, remote_decode=True)
                )
            else:
                pod.engine.add_request(SimRequest(req.request_id, ids, wr.max_tokens, lora=lora, arrival=now))
        except ValueError as e:  # the pod refuses it (too long): a 400 from the pod, as in real time
            flight.on_response_headers(400)
            gw.tracker.finish(flight, "status_400")
            finish_failed(wr.index, wr.stage, now, 400, str(e))
            return
        lv = _Live(wr.index, wr.stage, now, flight, ids=ids, max_tokens=wr.max_tokens, lora=lora,
                   prefill_pod=pep.address if pep is not None else "")
        live[req.request_id] = lv
        if pep is not None:
            prefill_legs[req.request_id + PREFILL_SUFFIX] = lv
        loop.kick(target, now)

    # the predictor's step-phase features read "now" and each pod's last chunk time: give them virtual time
    prev_clock = set_clock(clock)
    try:
        loop.run(arrive, on_tick=scrape, before=mark_stages, stop=lambda: remaining <= 0)
    finally:
        set_clock(prev_clock)
        while len(pred_marks) < len(bounds) + 1:
            pred_marks.append(gw.predictor_marks())
        predictor = gw.close()
    while len(stage_marks) < len(bounds):
        stage_marks.append(counters())
    stage_marks.append(counters())
    if predictor is not None:
        predictor["stages"] = [
            {"decisions": b[0] - a[0], "fallback_decisions": b[1] - a[1], "retrains": b[2] - a[2], "samples": b[3] - a[3]}
            for a, b in zip(pred_marks, pred_marks[1:])
        ]
    prefix: list[tuple[float, float] | None] = []
    for i in range(len(bounds)):
        h0, q0 = stage_marks[i]
        h1, q1 = stage_marks[i + 1]
        prefix.append((h1 - h0, q1 - q0))
    if progress is not None and done % 100:
        progress(done % 100)
    out = [r for r in results if r is not None]
    extra: dict[str, Any] = {}
    if predictor is not None:
        extra["predictor"] = predictor
    return VirtualResult(out, prefix, loop.now, time.perf_counter() - wall0, loop.steps, extra)


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
    warm_start: str | None = None,
    stream: bool = True,
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
                vr = run_virtual(workload, s, fl, seed=seed, progress=lambda n, t=task: prog.advance(t, n),
                                 warm_start=warm_start, stream=stream)
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
            if "predictor" in vr.extra:
                cfg["predictor"] = vr.extra["predictor"]
            if s.pd:
                cfg.update(pd_roles={a: r for (_, a), r in zip(fl.pods, fl.roles)}, link=fl.link,
                           kv_failure_rate=fl.kv_failure_rate, kv_load_failure_policy=fl.kv_load_failure_policy,
                           prefill_pods=sum(1 for r in fl.roles if r == "prefill"),
                           split_requests=sum(1 for r in vr.results if r.prefill_pod))
            runs.append(SetupRun(s.name, "ok", config=cfg, results=vr.results, prefix=vr.prefix))
    return runs
