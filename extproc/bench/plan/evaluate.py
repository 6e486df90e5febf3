"""One candidate deployment: its files (profiles with the vLLM limits, the scheduler config with the classes'
objectives and the admission parameters), its run in virtual time — the same ``extproc.bench.virtual`` code
path as ``extproc bench --virtual --setups extproc:CONFIG`` — and its metrics against the SPEC's SLOs."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from extproc.bench.plan.spec import SLO, Spec
from extproc.bench.report import RequestResult, percentile
from extproc.bench.workloads import Workload


@dataclass(slots=True)
class Candidate:
    """A point of the search space, canonical (P/D candidates carry the P/D routing, whatever ``routing`` said)."""

    params: dict[str, Any]
    fleet: list[tuple[str, int]]  # (profile, count), zero counts dropped, in the SPEC's order
    cost_per_hour: float
    key: str  # canonical JSON of params: equal keys = the same deployment

    @property
    def pods(self) -> int:
        return sum(n for _, n in self.fleet)

    @property
    def pd_prefill(self) -> int:
        return int(self.params["pd_prefill"])


def canonical(spec: Spec, params: dict[str, Any]) -> Candidate | None:
    """The candidate for ``params`` (dimension -> value), or None when it is not a deployment (no pod, or a P/D
    split with no decode pod left)."""
    fleet = [(p.profile, int(params[f"pods.{p.profile}"])) for p in spec.pods]
    fleet = [(prof, n) for prof, n in fleet if n > 0]
    total = sum(n for _, n in fleet)
    k = int(params["pd_prefill"])
    if total == 0 or (k > 0 and k >= total):
        return None
    p = dict(params)
    if k > 0:
        p["routing"] = spec.pd_routing
    cost = sum(n * next(o.cost_per_hour for o in spec.pods if o.profile == prof) for prof, n in fleet)
    return Candidate(p, fleet, round(cost, 6), json.dumps(p, sort_keys=True))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _short(path_or_name: str) -> str:
    base = os.path.basename(path_or_name)
    return os.path.splitext(base)[0] if base.endswith((".yaml", ".yml")) else base


class Materializer:
    """Writes each distinct profile variant and scheduler config once under ``out_dir`` (content-addressed
    names), so every candidate is a fleet string plus a config path any ``extproc bench`` run can use."""

    def __init__(self, spec: Spec, out_dir: str) -> None:
        self.spec = spec
        self.out = os.path.abspath(out_dir)
        self._written: dict[str, str] = {}

    def _write(self, sub: str, name: str, data: dict[str, Any]) -> str:
        path = os.path.join(self.out, sub, name)
        if path not in self._written:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                yaml.safe_dump(data, f, sort_keys=False)
            self._written[path] = path
        return path

    def profile(self, profile: str, seqs: int | None, batched: int | None) -> str:
        """The profile (name or path) with the candidate's vLLM limits: the name itself when it has none."""
        from extproc.sim.profiles import get_profile

        if seqs is None and batched is None:
            return profile
        prof = get_profile(profile)
        changes: dict[str, Any] = {}
        if seqs is not None:
            changes["max_num_seqs"] = seqs
        if batched is not None:
            changes["max_num_batched_tokens"] = batched
        d = prof.replace(**changes).to_dict()
        d["name"] = f"{prof.name}-s{d['max_num_seqs']}-b{d['max_num_batched_tokens']}"
        return self._write("profiles", f"{d['name']}-{_digest(d)}.yaml", d)

    def fleet(self, cand: Candidate) -> str:
        seqs = cand.params["max_num_seqs"]
        batched = cand.params["max_num_batched_tokens"]
        return ",".join(f"{self.profile(prof, seqs, batched)}:{n}" for prof, n in cand.fleet)

    def config(self, cand: Candidate) -> str:
        """The candidate's routing config with the classes' objectives and its admission parameters."""
        with open(cand.params["routing"], encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        objectives = {o.get("name"): o for o in raw.get("objectives") or [] if isinstance(o, dict)}
        for tc in self.spec.classes:
            objectives[tc.name] = {"name": tc.name, "priority": tc.priority}
        raw["objectives"] = list(objectives.values())
        adm = {k[len("admission."):]: v for k, v in cand.params.items() if k.startswith("admission.")}
        if adm:
            sd = dict(raw.get("saturationDetector") or {})
            for k, v in adm.items():
                sd[k] = int(v) if k in ("queueDepthThreshold", "maxInflightPerPod") else v
            raw["saturationDetector"] = sd
        name = f"{_short(cand.params['routing'])}-{_digest(raw)}.yaml"
        return self._write("configs", name, raw)


def bench_command(spec: Spec, fleet: str, config: str, pd_prefill: int, virtual: bool, out: str) -> str:
    """The ``extproc bench`` line that runs this candidate on the same trace (real time unless ``virtual``)."""
    parts = ["extproc", "bench", "--workload-spec", os.path.abspath(spec.path), "--fleet", fleet,
             "--setups", f"extproc:{config}", "--seed", str(spec.seed)]
    if spec.kv_blocks:
        parts += ["--kv-blocks", str(spec.kv_blocks)]
    if pd_prefill:
        parts += ["--pd-prefill", str(pd_prefill)]
    if virtual:
        parts.append("--virtual")
    parts += ["--out", out]
    return " ".join(parts)


@dataclass(slots=True)
class Evaluation:
    id: str
    candidate: Candidate
    fleet: str
    config: str
    status: str  # ok | failed
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    slo_met: bool = False
    slo_attainment: float = 0.0
    violation: float = math.inf  # max relative excess over an SLO target (<= 0: every SLO met)
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0


def _value(slo: SLO, results: Sequence[RequestResult], total: int) -> float | None:
    if slo.metric == "success_rate":
        return len(results) / total if total else None
    if not results:
        return None
    xs = [_metric(slo.metric, r) for r in results]
    return percentile(xs, slo.percentile)


def _metric(metric: str, r: RequestResult) -> float:
    if metric == "ttft":
        return r.ttft_ms
    if metric == "e2e":
        return r.e2e_ms
    return r.tpot_ms  # itl: the request's mean inter-token latency


def class_metrics(spec: Spec, workload: Workload, results: Sequence[RequestResult], repeats: int = 1) -> dict[str, Any]:
    """Per class: counts, latency distributions and each SLO's value, target and verdict; the attainment
    (fraction of the class's requests that completed within every latency target of the class) and, over all
    classes, ``slo_met``, ``slo_attainment`` (mean of the classes' attainments) and ``violation``. ``repeats``:
    the results hold the trace that many times (a real-time ``--repeat`` run)."""
    by_class: dict[str, list[RequestResult]] = {tc.name: [] for tc in spec.classes}
    totals = {tc.name: 0 for tc in spec.classes}
    for wr in workload.requests:
        if wr.objective in totals:
            totals[wr.objective] += repeats
    for r in results:
        c = workload.requests[r.index].objective
        if c in by_class:
            by_class[c].append(r)
    out: dict[str, Any] = {"classes": {}, "checks": []}
    attain: list[float] = []
    violation = -math.inf
    for tc in spec.classes:
        rs = by_class[tc.name]
        ok = [r for r in rs if r.ok]
        total = totals[tc.name]
        errors: dict[str, int] = {}
        for r in rs:
            if not r.ok:
                errors[str(r.status or "error")] = errors.get(str(r.status or "error"), 0) + 1
        entry: dict[str, Any] = {
            "requests": total, "ok": len(ok), "success_rate": round(len(ok) / total, 4) if total else None,
            "errors": errors,
            "ttft_ms": _dist([r.ttft_ms for r in ok]), "itl_ms": _dist([r.tpot_ms for r in ok if r.output_tokens > 1]),
            "e2e_ms": _dist([r.e2e_ms for r in ok]), "output_tokens": sum(r.output_tokens for r in ok),
        }
        slos = spec.slos.get(tc.name, [])
        lat = [s for s in slos if s.metric != "success_rate"]
        if slos:
            good = sum(1 for r in ok if all(_metric(s.metric, r) <= s.target for s in lat))
            entry["attainment"] = round(good / total, 4) if total else 0.0
            attain.append(entry["attainment"])
        for s in slos:
            v = _value(s, ok, total)
            if v is None:
                met, excess = False, math.inf
            elif s.metric == "success_rate":
                met = v >= s.target
                excess = (s.target - v) / max(s.target, 1e-9)
            else:
                met = v <= s.target
                excess = v / s.target - 1.0
            violation = max(violation, excess)
            chk = {"class": tc.name, "slo": s.key, "target": s.target, "value": None if v is None else round(v, 4), "met": met}
            out["checks"].append(chk)
        out["classes"][tc.name] = entry
    out["slo_met"] = all(c["met"] for c in out["checks"])
    out["slo_attainment"] = round(sum(attain) / len(attain), 4) if attain else 0.0
    out["violation"] = round(violation, 4) if math.isfinite(violation) else None
    return out


def _dist(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"p50": round(percentile(xs, 50), 3), "p90": round(percentile(xs, 90), 3), "p99": round(percentile(xs, 99), 3),
            "mean": round(sum(xs) / len(xs), 3)}


def evaluate(spec: Spec, workload: Workload, cand: Candidate, mat: Materializer, cid: str,
             token_cache: dict[int, list[int]] | None = None) -> Evaluation:
    """Run the candidate in virtual time (same seed, same trace as every other candidate: cold caches).
    ``token_cache``: the trace's prompt token ids, shared by all candidates of a search (tokenized once)."""
    import time

    from extproc.bench import virtual
    from extproc.bench.setups import path_setup

    ev = Evaluation(cid, cand, "", "", "ok")
    t0 = time.perf_counter()
    try:
        ev.fleet = fleet = mat.fleet(cand)
        ev.config = config = mat.config(cand)
        setup = path_setup(f"extproc:{config}")
        fl = virtual.layout(fleet, spec.kv_blocks)
        if setup.pd:
            fl = fl.split(cand.pd_prefill)
        vr = virtual.run_virtual(workload, setup, fl, seed=spec.seed, token_cache=token_cache)
    except Exception as e:  # one broken candidate must not lose the search
        ev.status, ev.error = "failed", f"{type(e).__name__}: {e}"
        ev.wall_seconds = time.perf_counter() - t0
        return ev
    m = class_metrics(spec, workload, vr.results)
    ev.checks = m.pop("checks")
    ev.slo_met = bool(m.pop("slo_met"))
    ev.slo_attainment = float(m.pop("slo_attainment"))
    v = m.pop("violation")
    ev.violation = math.inf if v is None else float(v)
    ok = [r for r in vr.results if r.ok]
    span = max([workload.stages[0].duration] + [r.end for r in ok])
    m["output_tok_s"] = round(sum(r.output_tokens for r in ok) / span, 2)
    hits = sum(h for h, _ in (p for p in vr.prefix if p is not None))
    queries = sum(q for _, q in (p for p in vr.prefix if p is not None))
    m["prefix_hit_rate"] = round(hits / queries, 4) if queries else None
    m["split_requests"] = sum(1 for r in vr.results if r.prefill_pod)
    ev.metrics = m
    ev.virtual_seconds = vr.virtual_seconds
    ev.wall_seconds = time.perf_counter() - t0
    return ev
