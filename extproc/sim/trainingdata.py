"""Training data from simulator traffic, in virtual time.

A heterogeneous fleet of ``extproc.sim.engine.Engine`` instances (one per simulated pod) is driven by the
virtual benchmark's discrete-event loop (``extproc.sim.vfleet``): Poisson arrivals whose rate sweeps from light to overload, prompts with shared prefixes
(so prefix-cache scores vary), a share of LoRA-adapter requests, and a mix of routing policies (random,
least-in-flight, best-prefix) so the data covers balanced and unbalanced states. At each arrival the same
``build_matrix`` the live server uses turns each pod's state into features (the engine's waiting / running /
KV use / adapters, our own in-flight counters, the exact cached-prefix share); the chosen pod's row is kept and
labelled with the TTFT (dispatch → first token) and TPOT ((finish − first token) / (tokens − 1)) it got.

Step phase: every engine step that emits tokens is a response chunk the scheduler sees at the step's end, so the
loop calls the server's own ``observe_chunk`` on the pod's Endpoint then, and ``build_matrix`` gets the virtual
decision time: ``since_last_chunk_ms`` / ``step_interval_ms`` are what a gateway would have observed, not the
hidden phase (which is kept apart in ``Dataset.phase_ms`` for the error analysis only).

Simplification vs. live traffic: metrics are read at the instant of the decision (no scrape staleness) and the
network adds nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint
from extproc.predictor.features import N_FEATURES, PodClassCodes, build_matrix, observe_chunk
from extproc.sim.engine import Engine, SimRequest, StepResult
from extproc.sim.profiles import get_profile
from extproc.sim.vfleet import VirtualFleetLoop, VirtualPod, engine_metrics

DEFAULT_FLEET: tuple[str, ...] = (
    "llama3-8b-h100",
    "llama3-8b-h100",
    "llama3-8b-a100",
    "llama3-8b-a100",
    "llama3-8b-l40s",
    "llama3-8b-l40s",
)
BASE_MODEL = "llama3-8b"
ADAPTERS: tuple[str, ...] = tuple(f"adapter-{i}" for i in range(6))


@dataclass(slots=True)
class Dataset:
    x: np.ndarray  # (n, N_FEATURES)
    ttft_ms: np.ndarray
    tpot_ms: np.ndarray  # 0 where fewer than two output tokens
    pod_classes: dict[str, int] = field(default_factory=dict)
    # What the scheduler cannot see, kept for the error analysis: the time left in the step the chosen pod was
    # running when the request arrived (0 = idle pod), i.e. the unavoidable wait before its prefill can start.
    phase_ms: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __len__(self) -> int:
        return len(self.ttft_ms)

    def save(self, path: str) -> None:
        np.savez_compressed(path, x=self.x, ttft=self.ttft_ms, tpot=self.tpot_ms)


@dataclass(slots=True)
class _Pending:
    row: np.ndarray
    pod: int
    prompt_tokens: int
    max_tokens: int
    dispatch: float
    phase_ms: float
    first: float = -1.0


def _rates(n_requests: int, capacity_rps: float, rng: random.Random) -> list[float]:
    """Arrival times: segments of 200 requests whose rate sweeps 0.2×..1.4× the nominal capacity."""
    times: list[float] = []
    t = 0.0
    levels = [0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4]
    seg = 0
    while len(times) < n_requests:
        rate = capacity_rps * levels[rng.randrange(len(levels))] if seg else capacity_rps * 0.3
        for _ in range(min(200, n_requests - len(times))):
            t += rng.expovariate(rate)
            times.append(t)
        seg += 1
    return times


def generate(
    n_requests: int = 12000,
    *,
    seed: int = 0,
    fleet: Sequence[str] = DEFAULT_FLEET,
    capacity_rps: float | None = None,
    classes: PodClassCodes | None = None,
    lora_share: float = 0.15,
    prefix_share: float = 0.6,
) -> Dataset:
    """Run the fleet on ``n_requests`` arrivals and return one labelled feature row per finished request."""
    rng = random.Random(seed)
    classes = classes or PodClassCodes()
    pods: list[VirtualPod] = []
    for i, name in enumerate(fleet):
        prof = get_profile(name)
        ep = Endpoint(f"10.0.0.{i + 1}:8000", {"accelerator": prof.accelerator}, [BASE_MODEL])
        pods.append(VirtualPod(ep, Engine(prof, seed=seed * 1000 + i, record_kv_events=False)))
        ep.set_metrics(engine_metrics(pods[-1].engine, 1.0))
    if capacity_rps is None:
        # Rough sustainable rate: decode-bound throughput of each pod at batch 64 over ~200 output tokens.
        capacity_rps = sum(64.0 / ((p.engine.profile.b0_ms + 64 * p.engine.profile.b2_ms) / 1000.0) / 200.0 for p in pods)
    arrivals = _rates(n_requests, capacity_rps, rng)
    prefixes = [[rng.randrange(1000, 30000) for _ in range(rng.choice((128, 512, 1024, 2048)))] for _ in range(24)]

    pending: dict[str, _Pending] = {}
    out_x: list[np.ndarray] = []
    out_t: list[float] = []
    out_p: list[float] = []
    out_ph: list[float] = []

    def deliver(pod: VirtualPod, res: StepResult, now: float) -> None:
        ep = pod.endpoint
        if res.outputs:
            observe_chunk(ep, now)  # this step's tokens reach the gateway as chunks now
        for o in res.outputs:
            pr = pending.get(o.request_id)
            if pr is None:
                continue
            if o.first_token:
                pr.first = now
                ep.prefill_done(pr.prompt_tokens, pr.max_tokens)
            if o.finished:
                del pending[o.request_id]
                ep.release_inflight(decode_tokens=pr.max_tokens)
                ttft = (pr.first - pr.dispatch) * 1000.0
                n_out = o.num_output_tokens
                tpot = (now - pr.first) * 1000.0 / (n_out - 1) if n_out > 1 else 0.0
                out_x.append(pr.row)
                out_t.append(ttft)
                out_p.append(tpot)
                out_ph.append(pr.phase_ms)

    loop = VirtualFleetLoop(deliver)
    loop.add_arrivals(arrivals)

    def arrive(index: int, now: float) -> None:
        rid = f"r{index}"
        use_prefix = rng.random() < prefix_share
        prompt: list[int] = list(rng.choice(prefixes)) if use_prefix else []
        suffix = max(8, int(rng.lognormvariate(5.5, 1.0)))
        prompt += [rng.randrange(1000, 30000) for _ in range(min(suffix, 3000))]
        max_tokens = max(2, min(1024, int(rng.lognormvariate(4.8, 0.9))))
        lora = rng.choice(ADAPTERS) if rng.random() < lora_share else None
        model = lora or BASE_MODEL
        req = InferenceRequest(
            request_id=rid,
            path="/v1/completions",
            api="completions",
            model=model,
            target_model=model,
            body={},
            body_size=0,
            prompt_text="",
            max_tokens=max_tokens,
            prompt_token_ids=prompt,
            stream=True,
        )
        for p in pods:
            p.endpoint.set_metrics(engine_metrics(p.engine, 1.0))
        prefix_scores = {p.endpoint.address: p.engine.cached_prefix_tokens(prompt, lora) / len(prompt) for p in pods}
        eps = [p.endpoint for p in pods]
        x = build_matrix(req, eps, prefix_scores, classes, now=now)
        u = rng.random()
        if u < 0.4:
            pi = rng.randrange(len(pods))
        elif u < 0.75:
            pi = min(range(len(pods)), key=lambda i: (pods[i].endpoint.inflight, rng.random()))
        else:
            pi = max(range(len(pods)), key=lambda i: (prefix_scores[eps[i].address], -pods[i].endpoint.inflight))
        pod = pods[pi]
        try:
            pod.engine.add_request(SimRequest(rid, prompt, max_tokens, lora=lora, arrival=now))
        except ValueError:
            return
        ep = pod.endpoint
        ep.add_inflight(len(prompt))
        phase = (pod.busy_until - now) * 1000.0 if pod.busy_until >= 0 else 0.0
        pending[rid] = _Pending(x[pi].copy(), pi, len(prompt), max_tokens, now, phase)
        loop.kick(pod, now)

    loop.run(arrive)
    x_arr = np.stack(out_x) if out_x else np.empty((0, N_FEATURES))
    return Dataset(x_arr, np.asarray(out_t), np.asarray(out_p), classes.as_dict(), np.asarray(out_ph))
