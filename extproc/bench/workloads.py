"""Benchmark workloads: deterministic request traces with staged Poisson arrivals.

A workload is a list of ``WorkloadRequest`` records (arrival time, API, model, prompt, output length) generated
only from the workload name, the stages and the seed, so every setup of a benchmark replays the SAME trace.
Prompt text is built from a fixed pseudo-word vocabulary, so any tokenizer (the simulator's included) turns it
into the same token ids on every run.

Shapes follow the GIE / llm-d benchmarking workloads (see /docs/benchmarks.md for the scaling arithmetic):

- ``shared-prefix``: G groups, each with one long system prompt and P questions; every request picks a group and a
  question at random (inference-perf's ``shared_prefix`` data). Scaled so the fleet's KV cache holds all system
  prompts only when each group stays on few pods: placement decides the hit rate.
- ``multi-turn``: chat sessions over a few shared system prompts; each turn resends the whole history.
- ``multi-lora``: ShareGPT-like lengths, four adapters with a 50/30/15/5 traffic split.
- ``heterogeneous``: ShareGPT-like chat with moderate prefix sharing, meant for a fleet of fast and slow pods.
- ``three-vendor``: the same chat traffic on a fleet that mixes AMD (2 × MI300X, vLLM ROCm), Intel (2 × Gaudi 3,
  vLLM HPU) and NVIDIA (4 × L40S, the lower-cost tier) pods, after IBM/Red Hat/NxtGen's three-vendor sovereign
  cluster (llm-d blog, 2026): the whole premium tier is hardware the shipped warm-start model never saw.
- ``long-prompts``: 100–200 KB bodies (documents with questions), few documents shared by many requests.
- ``bursty``: shared-prefix traffic arriving in bursts (on/off), the thundering-herd case.
- ``pd``: long prompts, short outputs (the llm-d P/D guide's ISL/OSL 5000/250 fits the simulated Llama-3-8B's
  8k context as is) on Llama-3-8B/H100 with the roofline step model (decode cost grows with context): mostly
  cold prompts (a document from a large pool plus a unique question); the few repeated documents may be cached on
  the decode pod (what the prefix-based P/D decider looks at). P/D setups split the same fleet into
  ``pd_prefill`` prefill pods and the rest decode pods.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Roughly how many characters one token of our pseudo-word text takes (words are 3-8 letters + space); used only
# to size prompts. The exact token counts come from the simulator's tokenizer.
CHARS_PER_TOKEN = 4
MODEL = "sim-llama"
OBJECTIVE_HEADER = "x-gateway-inference-objective"  # the request's traffic class (the config maps it to a priority)
LORAS: tuple[str, ...] = ("sim-lora-a", "sim-lora-b", "sim-lora-c", "sim-lora-d")
LORA_SPLIT: tuple[float, ...] = (0.50, 0.30, 0.15, 0.05)

_SYLLABLES = (
    "ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "va", "ze", "bo", "da", "fi", "gu", "he", "jo",
    "ke", "li", "mo", "ne", "pa", "ri", "su", "ti", "vo", "wa", "xe", "yo", "zu", "an", "el", "or",
)


def _vocabulary(size: int = 2048) -> tuple[str, ...]:
    """A fixed vocabulary of pseudo-words (seeded by a constant: identical in every process and run)."""
    rng = random.Random("extproc-bench-vocabulary")
    words: dict[str, None] = {}
    while len(words) < size:
        n = rng.randint(2, 4)
        words["".join(rng.choice(_SYLLABLES) for _ in range(n))] = None
    return tuple(words)


VOCAB = _vocabulary()


def text(rng: random.Random, tokens: int) -> str:
    """Deterministic pseudo-text of about ``tokens`` tokens (``CHARS_PER_TOKEN`` characters each)."""
    target = max(1, tokens) * CHARS_PER_TOKEN
    out: list[str] = []
    n = 0
    while n < target:
        w = VOCAB[rng.randrange(len(VOCAB))]
        out.append(w)
        n += len(w) + 1
    return " ".join(out) + "\n"


@dataclass(slots=True, frozen=True)
class Stage:
    """A load stage: Poisson arrivals at ``rate`` requests/s for ``duration`` seconds."""

    rate: float
    duration: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"stage rate must be > 0, got {self.rate}")
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"stage duration must be > 0, got {self.duration}")


def parse_stages(spec: str) -> list[Stage]:
    """``"2:30,4:30,8:30"`` → stages of (rate req/s, seconds)."""
    stages: list[Stage] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        rate, sep, secs = part.partition(":")
        if not sep:
            raise ValueError(f"stage {part!r} must be RATE:SECONDS")
        try:
            stages.append(Stage(float(rate), float(secs)))
        except ValueError as e:
            raise ValueError(f"bad stage {part!r}: {e}") from None
    if not stages:
        raise ValueError("no stages given")
    return stages


@dataclass(slots=True)
class WorkloadRequest:
    """One request of a trace. Prompt text is kept as shared parts (joined on demand) to keep traces small."""

    index: int
    stage: int
    arrival: float  # seconds since the start of the run
    api: str  # "completions" | "chat"
    model: str
    max_tokens: int
    parts: tuple[str, ...] = ()  # completions: prompt = "".join(parts)
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content)
    group: int = -1  # shared-prefix group / session / document, for analysis
    session: str = ""  # multi-turn session id (sent as x-session-token)
    objective: str = ""  # traffic class, sent as x-gateway-inference-objective (``extproc plan`` mixes classes)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"

    def prompt(self) -> str:
        return "".join(self.parts)

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", "x-request-id": f"bench-{self.index}"}
        if self.session:
            h["x-session-token"] = self.session
        if self.objective:
            h[OBJECTIVE_HEADER] = self.objective
        return h

    def body(self, stream: bool = True) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.api == "chat":
            b["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        else:
            b["prompt"] = self.prompt()
        if stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        # The simulator (like vLLM with ignore_eos) then emits exactly max_tokens tokens: comparable work per setup.
        b["ignore_eos"] = True
        return b

    def body_bytes(self, stream: bool = True) -> bytes:
        return json.dumps(self.body(stream), separators=(",", ":")).encode()


@dataclass(slots=True)
class Workload:
    name: str
    seed: int
    stages: list[Stage]
    requests: list[WorkloadRequest]
    params: dict[str, Any] = field(default_factory=dict)  # the generator parameters, for the report
    fleet: str = ""  # fleet the workload is meant for (FleetSpec.fleet syntax), "" = homogeneous default
    loras: tuple[str, ...] = ()
    kv_blocks: int | None = None  # per-pod KV blocks the workload is sized for (None = profile default)
    pd_prefill: int = 0  # P/D setups: how many of the fleet's pods are prefill-role (0 = half)

    def stage_requests(self, stage: int) -> list[WorkloadRequest]:
        return [r for r in self.requests if r.stage == stage]

    def stage_bounds(self) -> list[tuple[float, float]]:
        t = 0.0
        out = []
        for s in self.stages:
            out.append((t, t + s.duration))
            t += s.duration
        return out


def poisson_arrivals(rng: random.Random, stages: Sequence[Stage]) -> list[tuple[int, float]]:
    """(stage index, arrival time) for Poisson arrivals in consecutive stages."""
    out: list[tuple[int, float]] = []
    t0 = 0.0
    for i, s in enumerate(stages):
        t = t0
        end = t0 + s.duration
        while True:
            t += rng.expovariate(s.rate)
            if t >= end:
                break
            out.append((i, t))
        t0 = end
    return out


def bursty_arrivals(rng: random.Random, stages: Sequence[Stage], period: float = 2.0, on: float = 0.1) -> list[tuple[int, float]]:
    """On/off arrivals with the stage's mean rate: every ``period`` s, a burst squeezed into ``on`` s."""
    out: list[tuple[int, float]] = []
    t0 = 0.0
    for i, s in enumerate(stages):
        end = t0 + s.duration
        burst_start = t0
        while burst_start < end:
            n = _poisson_count(rng, s.rate * period)
            for _ in range(n):
                t = burst_start + rng.random() * on
                if t < end:
                    out.append((i, t))
            burst_start += period
        t0 = end
    out.sort(key=lambda x: x[1])
    return out


def _poisson_count(rng: random.Random, lam: float) -> int:
    # Knuth for small means, normal approximation for large ones.
    if lam < 30:
        limit = math.exp(-lam)
        k, p = 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(lam, math.sqrt(lam))))


def _sharegpt_len(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    """Log-normal lengths with the given mean, clipped (ShareGPT-like: many short, a long tail)."""
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(hi, max(lo, rng.lognormvariate(mu, sigma))))


# --------------------------------------------------------------------------------------------------- generators


@dataclass(slots=True, frozen=True)
class SharedPrefixParams:
    groups: int = 32
    prompts_per_group: int = 8
    system_tokens: int = 1500
    question_tokens: int = 150
    output_tokens: int = 100
    kv_blocks: int = 600  # per pod, 16-token blocks = 9,600 tokens (see docs/benchmarks.md for the arithmetic)


def _shared_prefix(rng: random.Random, arrivals: list[tuple[int, float]], p: SharedPrefixParams) -> list[WorkloadRequest]:
    systems = [f"[group {g}] " + text(rng, p.system_tokens) for g in range(p.groups)]
    questions = [[f"Question {g}.{q}: " + text(rng, p.question_tokens) for q in range(p.prompts_per_group)] for g in range(p.groups)]
    out = []
    for i, (stage, t) in enumerate(arrivals):
        g = rng.randrange(p.groups)
        q = rng.randrange(p.prompts_per_group)
        out.append(WorkloadRequest(i, stage, t, "completions", MODEL, p.output_tokens, parts=(systems[g], questions[g][q]), group=g))
    return out


def gen_shared_prefix(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = SharedPrefixParams()
    reqs = _shared_prefix(rng, poisson_arrivals(rng, stages), p)
    return reqs, _params(p), {"kv_blocks": p.kv_blocks}


def gen_bursty(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = SharedPrefixParams()
    reqs = _shared_prefix(rng, bursty_arrivals(rng, stages), p)
    return reqs, {**_params(p), "burst_period_s": 2.0, "burst_on_s": 0.1}, {"kv_blocks": p.kv_blocks}


@dataclass(slots=True, frozen=True)
class MultiTurnParams:
    system_prompts: int = 6
    system_tokens: int = 1000
    sessions: int = 64
    turn_tokens: int = 40  # user message
    reply_tokens: int = 120  # assistant reply appended to the history (deterministic text)
    output_tokens: int = 120
    max_turns: int = 12


def gen_multi_turn(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = MultiTurnParams()
    systems = [text(rng, p.system_tokens) for _ in range(p.system_prompts)]
    history: list[list[tuple[str, str]]] = []
    sys_of: list[int] = []
    next_session = 0
    live: list[int] = []
    out: list[WorkloadRequest] = []

    def new_session() -> int:
        nonlocal next_session
        s = next_session
        next_session += 1
        g = rng.randrange(p.system_prompts)
        sys_of.append(g)
        history.append([("system", systems[g])])
        return s

    for i, (stage, t) in enumerate(poisson_arrivals(rng, stages)):
        if len(live) < p.sessions:
            live.append(new_session())
        k = rng.randrange(len(live))
        s = live[k]
        h = history[s]
        h.append(("user", f"Turn {len(h) // 2}: " + text(rng, p.turn_tokens)))
        out.append(WorkloadRequest(i, stage, t, "chat", MODEL, p.output_tokens, messages=tuple(h), group=sys_of[s], session=f"s{s}"))
        h.append(("assistant", text(rng, p.reply_tokens)))
        if len(h) // 2 >= p.max_turns:
            live[k] = new_session()
    return out, _params(p), {}


@dataclass(slots=True, frozen=True)
class ChatParams:
    input_mean: int = 300
    output_mean: int = 150
    sigma: float = 0.8
    shared_system_prompts: int = 8
    system_tokens: int = 400


def _chat(rng: random.Random, stages: list[Stage], p: ChatParams, models: Sequence[str], split: Sequence[float]) -> list[WorkloadRequest]:
    systems = [text(rng, p.system_tokens) for _ in range(p.shared_system_prompts)]
    out = []
    for i, (stage, t) in enumerate(poisson_arrivals(rng, stages)):
        model = rng.choices(list(models), weights=list(split))[0]
        g = rng.randrange(p.shared_system_prompts)
        user = text(rng, _sharegpt_len(rng, p.input_mean, p.sigma, 8, 4 * p.input_mean))
        out_len = _sharegpt_len(rng, p.output_mean, p.sigma, 4, 4 * p.output_mean)
        out.append(WorkloadRequest(i, stage, t, "chat", model, out_len, messages=(("system", systems[g]), ("user", user)), group=g))
    return out


def gen_multi_lora(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = ChatParams()
    reqs = _chat(rng, stages, p, LORAS, LORA_SPLIT)
    return reqs, {**_params(p), "loras": list(LORAS), "split": list(LORA_SPLIT)}, {"loras": LORAS}


def gen_heterogeneous(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = ChatParams()
    reqs = _chat(rng, stages, p, (MODEL,), (1.0,))
    return reqs, _params(p), {"fleet": "llama3-8b-h100:4,llama3-8b-l40s:4"}


THREE_VENDOR_FLEET = "llama3-8b-mi300x:2,llama3-8b-gaudi3:2,llama3-8b-l40s:4"


def gen_three_vendor(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = ChatParams()
    reqs = _chat(rng, stages, p, (MODEL,), (1.0,))
    return reqs, _params(p), {"fleet": THREE_VENDOR_FLEET}


@dataclass(slots=True, frozen=True)
class LongPromptParams:
    documents: int = 6
    min_bytes: int = 100_000
    max_bytes: int = 200_000
    min_tokens: int = 3_000  # fits the 8k context of the simulated Llama-3-8B with the question and the output
    max_tokens: int = 6_000
    question_tokens: int = 60
    output_tokens: int = 64


def padded_document(rng: random.Random, tokens: int, nbytes: int) -> str:
    """A fixed-width "document" of about ``nbytes`` characters but only about ``tokens`` tokens: lines of ~6 words
    padded with spaces to a common width (column-aligned reports, logs, code indentation). A whitespace run is one
    token for the simulator's tokenizer (and for BPE tokenizers), so the body is large on the wire while the prompt
    still fits the model's context."""
    lines = max(1, tokens // 7)
    width = max(32, nbytes // lines)
    out = []
    for _ in range(lines):
        line = text(rng, 6).rstrip("\n")[: width - 1]
        out.append(line.ljust(width - 1) + "\n")
    return "".join(out)


def gen_long_prompts(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = LongPromptParams()
    docs = [
        f"[document {d}]\n" + padded_document(rng, rng.randint(p.min_tokens, p.max_tokens), rng.randint(p.min_bytes, p.max_bytes))
        for d in range(p.documents)
    ]
    out = []
    for i, (stage, t) in enumerate(poisson_arrivals(rng, stages)):
        d = rng.randrange(p.documents)
        q = "Question: " + text(rng, p.question_tokens)
        out.append(WorkloadRequest(i, stage, t, "completions", MODEL, p.output_tokens, parts=(docs[d], q), group=d))
    return out, _params(p), {}


@dataclass(slots=True, frozen=True)
class PDParams:
    # The llm-d guide's 5000/250 prompts are random (no prefix reuse). Documents are drawn from a pool large enough
    # that few repeat (~7 % of the requests of the default 90 s trace, ~2 % of a 15 s window) but some do, so the
    # prefix-based decider's threshold has cached prefixes to look at. (A pool of 1,000 made 56 % of the last
    # stage's prompt tokens cache hits on aggregated pods: not the reference's cold-prompt conditions.)
    documents: int = 20_000
    document_tokens: int = 4_500  # shared part of the ~5k-token prompt
    question_min: int = 200
    question_max: int = 1_000  # unique part: the non-cached tokens when the document is cached
    output_tokens: int = 250
    # of the default 8-pod fleet (Llama-3-8B on H100, roofline step model): 4 prefill + 4 decode is the only split
    # that is stable and beats aggregated TPOT and E2E at 40 req/s (3:5 saturates its prefill pool there, 5:3 and
    # 6:2 their decode pools; docs/pd.md has the ratio sweep)
    pd_prefill: int = 4
    fleet: str = "llama3-8b-h100-roofline:8"


def gen_pd(rng: random.Random, stages: list[Stage]) -> tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]:
    p = PDParams()
    salt = rng.getrandbits(64)
    docs: dict[int, str] = {}  # built on first use: only the drawn documents are generated
    out = []
    for i, (stage, t) in enumerate(poisson_arrivals(rng, stages)):
        d = rng.randrange(p.documents)
        doc = docs.get(d)
        if doc is None:
            doc = docs[d] = f"[document {d}]\n" + text(random.Random(f"pd-doc:{salt}:{d}"), p.document_tokens)
        q = f"Question {i}: " + text(rng, rng.randint(p.question_min, p.question_max))
        out.append(WorkloadRequest(i, stage, t, "completions", MODEL, p.output_tokens, parts=(doc, q), group=d))
    return out, _params(p), {"pd_prefill": p.pd_prefill, "fleet": p.fleet}


def _params(p: Any) -> dict[str, Any]:
    return {k: getattr(p, k) for k in p.__slots__}


Generator = Callable[[random.Random, list[Stage]], tuple[list[WorkloadRequest], dict[str, Any], dict[str, Any]]]

WORKLOADS: dict[str, Generator] = {
    "shared-prefix": gen_shared_prefix,
    "multi-turn": gen_multi_turn,
    "multi-lora": gen_multi_lora,
    "heterogeneous": gen_heterogeneous,
    "three-vendor": gen_three_vendor,
    "long-prompts": gen_long_prompts,
    "bursty": gen_bursty,
    "pd": gen_pd,
}

# Default stages: Poisson rates stepped up to and past the saturation of an 8-pod simulated fleet.
DEFAULT_STAGES: dict[str, str] = {
    "shared-prefix": "4:20,8:20,16:20,24:20,32:20",
    "multi-turn": "4:20,8:20,16:20,24:20",
    "multi-lora": "4:20,8:20,16:20,24:20",
    "heterogeneous": "4:20,8:20,16:20,24:20",
    "three-vendor": "4:20,8:20,16:20,24:20",
    "long-prompts": "0.5:20,1:20,2:20,3:20",
    "bursty": "4:20,8:20,16:20,24:20",
    "pd": "20:30,30:30,40:30",
}


def generate(name: str, stages: Sequence[Stage] | None = None, seed: int = 0) -> Workload:
    """Build the workload ``name``'s trace. Same (name, stages, seed) → identical trace."""
    gen = WORKLOADS.get(name)
    if gen is None:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    st = list(stages) if stages else parse_stages(DEFAULT_STAGES[name])
    rng = random.Random(f"{name}:{seed}")
    reqs, params, fleet = gen(rng, st)
    return Workload(
        name=name,
        seed=seed,
        stages=st,
        requests=reqs,
        params=params,
        fleet=str(fleet.get("fleet", "")),
        loras=tuple(fleet.get("loras", ())),
        kv_blocks=fleet.get("kv_blocks"),
        pd_prefill=int(fleet.get("pd_prefill", 0)),
    )
