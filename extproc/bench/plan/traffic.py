"""One trace from a SPEC's traffic classes: each class's requests (one of our workloads, length distributions at
Poisson rates, or a trace file), tagged with the class as ``x-gateway-inference-objective``, merged by arrival
time and re-indexed. Same (classes, seed) -> the same trace, in ``extproc plan`` and in ``extproc bench
--workload-spec`` (which is how a planned candidate is re-run in real time on the same trace)."""

from __future__ import annotations

import dataclasses
import math
import random

from extproc.bench.plan.spec import Lengths, Spec, TrafficClass, load_trace
from extproc.bench.workloads import MODEL, Stage, Workload, WorkloadRequest, generate, parse_stages, poisson_arrivals, text


def _draw(rng: random.Random, d: Lengths) -> int:
    if d.sigma <= 0:
        return int(round(min(d.max, max(d.min, d.mean))))
    mu = math.log(d.mean) - d.sigma * d.sigma / 2
    return int(min(d.max, max(d.min, rng.lognormvariate(mu, d.sigma))))


def _prefixes(cname: str, groups: int, tokens: int) -> list[str]:
    return [f"[{cname} prefix {g}] " + text(random.Random(f"plan-prefix:{cname}:{g}"), tokens) for g in range(groups)]


def _class_requests(tc: TrafficClass, seed: int) -> list[WorkloadRequest]:
    """The class's requests (indices are re-assigned after the merge)."""
    if tc.workload:
        wl = generate(tc.workload, parse_stages(tc.stages), seed=seed)
        return [dataclasses.replace(r, objective=tc.name) for r in wl.requests]
    rng = random.Random(f"plan:{tc.name}:{seed}")
    out: list[WorkloadRequest] = []
    if tc.trace:
        rows = load_trace(tc.trace)
        cache: dict[tuple[int, int], str] = {}
        for i, row in enumerate(rows):
            n_in, n_out = int(row["input_tokens"]), int(row["output_tokens"])
            parts: tuple[str, ...]
            g = int(row.get("prefix_group", -1))
            if g >= 0:
                pt = int(row["prefix_tokens"])
                key = (g, pt)
                if key not in cache:
                    cache[key] = f"[{tc.name} prefix {g}] " + text(random.Random(f"plan-prefix:{tc.name}:{g}:{pt}"), pt)
                parts = (cache[key], f"Request {i}: " + text(rng, max(1, n_in - pt)))
            else:
                parts = (f"Request {i}: " + text(rng, n_in),)
            out.append(WorkloadRequest(i, 0, float(row["arrival"]), "completions", MODEL, n_out, parts=parts,
                                       group=g, objective=tc.name))
        return out
    assert tc.lengths_in is not None and tc.lengths_out is not None
    prefixes = _prefixes(tc.name, tc.prefix_groups, tc.prefix_tokens) if tc.prefix_groups else []
    for i, (stage, t) in enumerate(poisson_arrivals(rng, parse_stages(tc.stages))):
        n_in = _draw(rng, tc.lengths_in)
        n_out = _draw(rng, tc.lengths_out)
        if prefixes:
            g = rng.randrange(len(prefixes))
            parts = (prefixes[g], f"Request {i}: " + text(rng, max(1, n_in - tc.prefix_tokens)))
        else:
            g = -1
            parts = (f"Request {i}: " + text(rng, n_in),)
        out.append(WorkloadRequest(i, stage, t, "completions", MODEL, n_out, parts=parts, group=g, objective=tc.name))
    return out


def build_workload(spec: Spec) -> Workload:
    """The merged trace: one stage spanning all classes (rate = requests / span), requests sorted by arrival
    (ties: class order, then the class's own order), indices 0..n-1."""
    merged: list[tuple[float, int, int, WorkloadRequest]] = []
    for ci, tc in enumerate(spec.classes):
        for j, r in enumerate(_class_requests(tc, spec.seed + 1000 * ci)):
            merged.append((r.arrival, ci, j, r))
    merged.sort(key=lambda x: (x[0], x[1], x[2]))
    reqs = [dataclasses.replace(r, index=i, stage=0) for i, (_, _, _, r) in enumerate(merged)]
    if not reqs:
        raise ValueError(f"{spec.path}: workload: the classes produced no requests (rates too low for the stages?)")
    span = max(_class_span(tc) for tc in spec.classes)
    span = max(span, reqs[-1].arrival + 1e-3)
    counts = {tc.name: sum(1 for r in reqs if r.objective == tc.name) for tc in spec.classes}
    return Workload(
        name=f"plan:{spec.name}",
        seed=spec.seed,
        stages=[Stage(len(reqs) / span, span)],
        requests=reqs,
        params={"classes": {tc.name: {"priority": tc.priority, "source": tc.workload or ("trace" if tc.trace else "lengths"),
                                      "stages": tc.stages, "requests": counts[tc.name]} for tc in spec.classes}},
        kv_blocks=spec.kv_blocks,
    )


def _class_span(tc: TrafficClass) -> float:
    if tc.trace:
        return float(load_trace(tc.trace)[-1]["arrival"])
    return sum(s.duration for s in parse_stages(tc.stages))
