"""Simulator fidelity against measured serving runs: ``extproc sim validate SPEC --out DIR`` and
``extproc sim fit SPEC --out PROFILE``.

A SPEC (YAML) lists experiments: the model (an architecture name from extproc/sim/data/architectures.yaml or
inline dimensions), GPU, tensor-parallel degree, vLLM scheduler limits, the workload and, per load stage, the
measured client-side metrics (milliseconds)::

    name: my-runs
    defaults: {gpu: H100-SXM-80GB, block_size: 16, gpu_memory_utilization: 0.9}
    experiments:
      - name: llama-2-7b-tp1-codegen
        source: where the numbers come from
        model: Llama-2-7b            # or {layers: 32, hidden: 4096, heads: 32, kv_heads: 32, intermediate: 11008, vocab: 32000}
        tp: 1
        max_num_seqs: 128
        max_num_batched_tokens: 2048
        max_model_len: 4096
        # num_gpu_blocks: 7000      # else derived from gpu_memory_utilization
        workload:
          type: shared_prefix        # or: lengths
          num_groups: 10
          prompts_per_group: 10
          system_prompt_len: 100
          question_len: 466
          output_len: 247
          arrival: constant          # or poisson
        stages:
          - {rate: 5, duration_s: 600, measured: {ttft_mean: 25.0, ttft_p90: 28.4, e2e_mean: 1810, e2e_p90: 1940, itl_mean: 7.26}}

``lengths`` workloads draw ``input_len``/``output_len`` from ``{mean, std, min, max}`` (normal, clipped) with no
shared prefix. Each experiment runs through the real simulator engine (``extproc.sim.engine.Engine``) with a
roofline profile (``extproc.sim.roofline``) in virtual time: arrivals at the stage's rate, a per-request ingress
delay (API server) before the engine sees a request, and vLLM's asynchronous scheduling (the step after the one
running is already scheduled, so a request arriving during step k is first scheduled in step k+2).

Validation compares per stage and metric (``ttft_mean``, ``ttft_p90``, ``e2e_mean``, ``e2e_p90``, ``itl_mean``:
mean over requests of (e2e - ttft) / (output tokens - 1)) and summarises the absolute relative errors (median,
p90). Fitting: the step time is linear in the coefficients, so for a simulated run the stage means and the
requests at the p90 rank are linear in them too (each request's latency is the sum of the basis terms of the
steps it lived through); the fit solves relative least squares with non-negative coefficients on those rows,
re-simulates with the new coefficients and repeats (batch composition depends on the coefficients), keeping the
iterate with the lowest simulated loss (RMSE over stages of the absolute percentage errors of TTFT and E2E means).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from extproc.sim.engine import Engine, SimRequest
from extproc.sim.fidelity_args import DEFAULT_FREE, add_fit_arguments, add_validate_arguments
from extproc.sim.roofline import (
    TERMS,
    RooflineCoefficients,
    RooflineStepModel,
    default_coefficients,
    get_architecture,
    get_gpu,
    load_architectures,
    load_gpus,
    roofline_profile,
)

__all__ = [
    "METRICS",
    "Experiment",
    "Stage",
    "Spec",
    "SimRun",
    "load_spec",
    "simulate",
    "validate",
    "fit",
    "add_validate_arguments",
    "add_fit_arguments",
    "run_validate",
    "run_fit",
]

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("ttft_mean", "ttft_p90", "e2e_mean", "e2e_p90", "itl_mean")
_COEF_COLUMNS: tuple[str, ...] = (*TERMS, "ingress_ms", "egress_ms")
# a roofline multiplier below 1 would mean running faster than the datasheet peak
_LOWER: dict[str, float] = {"weights": 1.0, "kv": 1.0, "compute": 1.0, "tp_bytes": 1.0}


# ---- SPEC -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage:
    rate: float
    duration_s: float
    measured: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    model: Any  # architecture name or inline dimensions
    gpu: Any
    tp: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_gpu_blocks: int | None
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    workload: dict[str, Any]
    stages: tuple[Stage, ...]
    source: str = ""

    @property
    def model_name(self) -> str:
        return get_architecture(self.model).name


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    experiments: tuple[Experiment, ...]
    source: str = ""


_EXP_KEYS = {
    "name", "model", "gpu", "tp", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size",
    "num_gpu_blocks", "gpu_memory_utilization", "enable_prefix_caching", "chunked_prefill", "workload", "stages",
    "source", "notes",
}
_WORKLOAD_KEYS = {
    "shared_prefix": {"type", "num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len",
                      "extra_prompt_tokens", "arrival", "seed"},
    "lengths": {"type", "input_len", "output_len", "arrival", "seed"},
}


def _parse_experiment(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Experiment:
    d = {**defaults, **raw}
    unknown = set(d) - _EXP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown experiment fields {sorted(unknown)}")
    for k in ("name", "model", "gpu", "workload", "stages"):
        if k not in d:
            raise ValueError(f"{where}: missing {k!r}")
    if d.get("chunked_prefill", True) is not True:
        raise ValueError(f"{where}: only chunked prefill (vLLM V1's default) is modelled")
    wl = dict(d["workload"])
    wtype = wl.get("type", "shared_prefix")
    if wtype not in _WORKLOAD_KEYS:
        raise ValueError(f"{where}: workload type must be one of {sorted(_WORKLOAD_KEYS)}")
    bad = set(wl) - _WORKLOAD_KEYS[wtype]
    if bad:
        raise ValueError(f"{where}: unknown {wtype} workload fields {sorted(bad)}")
    if wl.get("arrival", "constant") not in ("constant", "poisson"):
        raise ValueError(f"{where}: arrival must be constant or poisson")
    wl["type"] = wtype
    stages = []
    for i, s in enumerate(d["stages"]):
        m = {str(k): float(v) for k, v in (s.get("measured") or {}).items() if v is not None}
        if float(s["rate"]) <= 0 or float(s["duration_s"]) <= 0:
            raise ValueError(f"{where}: stage {i}: rate and duration_s must be > 0")
        stages.append(Stage(float(s["rate"]), float(s["duration_s"]), m))
    get_architecture(d["model"])  # fail early on unknown names
    get_gpu(d["gpu"])
    return Experiment(
        name=str(d["name"]),
        model=d["model"],
        gpu=d["gpu"],
        tp=int(d.get("tp", 1)),
        max_num_seqs=int(d.get("max_num_seqs", 256)),
        max_num_batched_tokens=int(d.get("max_num_batched_tokens", 8192)),
        max_model_len=int(d.get("max_model_len", 8192)),
        block_size=int(d.get("block_size", 16)),
        num_gpu_blocks=int(d["num_gpu_blocks"]) if d.get("num_gpu_blocks") else None,
        gpu_memory_utilization=float(d.get("gpu_memory_utilization", 0.9)),
        enable_prefix_caching=bool(d.get("enable_prefix_caching", True)),
        workload=wl,
        stages=tuple(stages),
        source=str(d.get("source", "")),
    )


def load_spec(path: str | Path) -> Spec:
    """Parse a SPEC file (see the module docstring); ``architectures``/``gpus`` keys may add table entries."""
    p = Path(path)
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), list):
        raise ValueError(f"{path}: a SPEC is a mapping with an 'experiments' list")
    for key, loader in (("architectures", load_architectures), ("gpus", load_gpus)):
        extra = data.get(key)
        if isinstance(extra, str):
            loader(p.parent / extra)
        elif isinstance(extra, dict):
            tmp = p.parent / f".{p.stem}.{key}.yaml"
            tmp.write_text(yaml.safe_dump(extra), encoding="utf-8")
            try:
                loader(tmp)
            finally:
                tmp.unlink()
    defaults = data.get("defaults") or {}
    exps = tuple(_parse_experiment(e, defaults, f"{path}: experiment {i}") for i, e in enumerate(data["experiments"]))
    names = [e.name for e in exps]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: experiment names must be unique")
    return Spec(str(data.get("name", p.stem)), exps, str(data.get("source", "")))


# ---- workload -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Req:
    arrival: float
    stage: int
    prompt: list[int]
    max_tokens: int


def _lengths(rng: random.Random, spec: Mapping[str, Any] | int | float) -> int:
    if isinstance(spec, (int, float)):
        return max(1, int(spec))
    mean = float(spec["mean"])
    std = float(spec.get("std", 0.0))
    lo = int(spec.get("min", 1))
    hi = int(spec.get("max", 1 << 30))
    v = rng.gauss(mean, std) if std > 0 else mean
    return max(lo, min(hi, int(round(v))))


def _requests(exp: Experiment, seed: int, max_stage_s: float | None) -> list[_Req]:
    wl = exp.workload
    rng = random.Random(seed * 1_000_003 + int(wl.get("seed", 0)))
    vocab = get_architecture(exp.model).vocab
    poisson = wl.get("arrival", "constant") == "poisson"
    prompts: list[list[int]] = []
    outs: list[int] = []
    if wl["type"] == "shared_prefix":
        extra = int(wl.get("extra_prompt_tokens", 0))
        for _g in range(int(wl["num_groups"])):
            sys_ids = [rng.randrange(vocab) for _ in range(int(wl["system_prompt_len"]))]
            for _p in range(int(wl["prompts_per_group"])):
                q = int(wl["question_len"]) + extra
                prompts.append(sys_ids + [rng.randrange(vocab) for _ in range(q)])
                outs.append(int(wl["output_len"]))
        order = list(range(len(prompts)))
        rng.shuffle(order)
        prompts = [prompts[i] for i in order]
        outs = [outs[i] for i in order]
    reqs: list[_Req] = []
    t0 = 0.0
    k = 0
    for si, st in enumerate(exp.stages):
        dur = st.duration_s if max_stage_s is None else min(st.duration_s, max_stage_s)
        t = 0.0
        j = 0
        while True:
            t = t + rng.expovariate(st.rate) if poisson else j / st.rate
            if t >= dur:
                break
            j += 1
            if wl["type"] == "shared_prefix":
                i = k % len(prompts)
                reqs.append(_Req(t0 + t, si, prompts[i], outs[i]))
            else:
                n_in = _lengths(rng, wl["input_len"])
                n_out = _lengths(rng, wl["output_len"])
                reqs.append(_Req(t0 + t, si, [rng.randrange(vocab) for _ in range(n_in)], n_out))
            k += 1
        t0 += dur
    return reqs


# ---- simulation -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SimRun:
    """One simulated experiment: per-request timestamps and the basis terms of every step."""

    experiment: Experiment
    coefficients: RooflineCoefficients
    stage: np.ndarray  # per request
    arrival: np.ndarray  # client send time
    ttft: np.ndarray  # seconds (NaN: unfinished)
    e2e: np.ndarray
    out_tokens: np.ndarray
    phi_ttft: np.ndarray  # (requests, len(_COEF_COLUMNS)): latency = phi @ coefficient vector
    phi_e2e: np.ndarray
    stage_seconds: list[float]
    wall_s: float = 0.0
    steps: int = 0
    preemptions: int = 0

    def stage_mask(self, i: int) -> np.ndarray:
        return (self.stage == i) & ~np.isnan(self.e2e)

    def metrics(self, i: int) -> dict[str, float]:
        m = self.stage_mask(i)
        if not m.any():
            return {}
        ttft = self.ttft[m] * 1000.0
        e2e = self.e2e[m] * 1000.0
        out = self.out_tokens[m]
        dec = out > 1
        itl = (e2e[dec] - ttft[dec]) / (out[dec] - 1)
        return {
            "ttft_mean": float(ttft.mean()),
            "ttft_p90": float(np.percentile(ttft, 90)),
            "e2e_mean": float(e2e.mean()),
            "e2e_p90": float(np.percentile(e2e, 90)),
            "itl_mean": float(itl.mean()) if itl.size else float("nan"),
            "requests": float(m.sum()),
        }


def _coef_vector(c: RooflineCoefficients) -> np.ndarray:
    return np.array([*c.step_vector(), c.ingress_ms / 1000.0, c.egress_ms / 1000.0])


def _from_vector(c: RooflineCoefficients, v: np.ndarray, source: str) -> RooflineCoefficients:
    d = {t: float(v[i]) for i, t in enumerate(TERMS)}
    d["ingress_ms"] = float(v[len(TERMS)] * 1000.0)
    d["egress_ms"] = float(v[len(TERMS) + 1] * 1000.0)
    return c.replace(**d, source=source)


def build_profile(exp: Experiment, coeffs: RooflineCoefficients) -> Any:
    return roofline_profile(
        exp.model,
        exp.gpu,
        exp.tp,
        coefficients=coeffs,
        max_num_seqs=exp.max_num_seqs,
        max_num_batched_tokens=exp.max_num_batched_tokens,
        block_size=exp.block_size,
        num_gpu_blocks=exp.num_gpu_blocks,
        gpu_memory_utilization=exp.gpu_memory_utilization,
        max_model_len=exp.max_model_len,
        name=exp.name,
    )


def simulate(
    exp: Experiment,
    coeffs: RooflineCoefficients,
    *,
    seed: int = 0,
    max_stage_s: float | None = None,
    async_scheduling: bool = True,
) -> SimRun:
    """Run one experiment through the engine in virtual time (see the module docstring)."""
    t_wall = time.perf_counter()
    prof = build_profile(exp, coeffs)
    eng = Engine(prof, seed=seed, enable_prefix_caching=exp.enable_prefix_caching, record_kv_events=False)
    sm = eng.step_model
    assert isinstance(sm, RooflineStepModel)
    terms: list[tuple[float, ...]] = []
    sm.record = terms
    reqs = _requests(exp, seed, max_stage_s)
    ingress = coeffs.ingress_ms / 1000.0
    egress = coeffs.egress_ms / 1000.0
    n = len(reqs)
    starts: list[float] = []
    durs: list[float] = []
    first_step = np.full(n, -1, dtype=np.int64)
    fin_step = np.full(n, -1, dtype=np.int64)
    t_first = np.full(n, np.nan)
    t_fin = np.full(n, np.nan)
    out_tok = np.zeros(n)
    nxt = 0  # next request not yet given to the engine
    t = 0.0
    prev_start = -math.inf  # start of the previous step when steps ran back to back
    rid_index: dict[str, int] = {}
    while nxt < n or eng.has_work():
        # requests the scheduler can see when it schedules the step starting at t
        horizon = prev_start if async_scheduling else t
        while nxt < n and reqs[nxt].arrival + ingress <= horizon:
            _add(eng, reqs[nxt], nxt, rid_index)
            nxt += 1
        if not eng.has_work():
            if nxt >= n:
                break
            # idle engine: the next arrival is scheduled as soon as it is seen
            t = max(t, reqs[nxt].arrival + ingress)
            while nxt < n and reqs[nxt].arrival + ingress <= t:
                _add(eng, reqs[nxt], nxt, rid_index)
                nxt += 1
        res = eng.step(t)
        idx = len(starts)
        dur = max(res.duration_s, 1e-9)  # a degenerate all-zero coefficient set must still advance time
        starts.append(t)
        durs.append(dur)
        end = t + dur
        for o in res.outputs:
            ri = rid_index[o.request_id]
            if o.first_token:
                first_step[ri] = idx
                t_first[ri] = end
            if o.finished:
                fin_step[ri] = idx
                t_fin[ri] = end
                out_tok[ri] = o.num_output_tokens
                del rid_index[o.request_id]
        prev_start = t
        t = end
    sm.record = None
    phi = np.asarray(terms, dtype=float).reshape(len(terms), len(TERMS))
    cum = np.vstack([np.zeros(len(TERMS)), np.cumsum(phi, axis=0)])
    arr = np.array([r.arrival for r in reqs])
    eng_arr = arr + ingress
    st_arr = np.asarray(starts)
    du_arr = np.asarray(durs)
    # the step in progress when the engine first sees each request (or the next one, if idle)
    s0 = np.searchsorted(st_arr, eng_arr, side="right") - 1
    frac = np.ones(n)
    for i in range(n):
        s = s0[i]
        if s < 0 or st_arr[s] + du_arr[s] <= eng_arr[i]:
            s0[i] = s + 1
        else:
            frac[i] = (st_arr[s] + du_arr[s] - eng_arr[i]) / du_arr[s] if du_arr[s] > 0 else 0.0
    ncol = len(_COEF_COLUMNS)
    phi_t = np.full((n, ncol), np.nan)
    phi_e = np.full((n, ncol), np.nan)
    done = fin_step >= 0
    for i in np.nonzero(done)[0]:
        f = first_step[i]
        e = fin_step[i]
        s = min(s0[i], f)
        head = frac[i] * phi[s] if s == s0[i] else phi[s]
        phi_t[i, : len(TERMS)] = head + cum[f + 1] - cum[s + 1]
        phi_e[i, : len(TERMS)] = head + cum[e + 1] - cum[s + 1]
    phi_t[:, len(TERMS)] = 1.0
    phi_t[:, len(TERMS) + 1] = 1.0
    phi_e[:, len(TERMS)] = 1.0
    phi_e[:, len(TERMS) + 1] = 1.0
    ttft = t_first + egress - arr
    e2e = t_fin + egress - arr
    ttft[~done] = np.nan
    e2e[~done] = np.nan
    stage_s = [st.duration_s if max_stage_s is None else min(st.duration_s, max_stage_s) for st in exp.stages]
    return SimRun(
        exp, coeffs, np.array([r.stage for r in reqs]), arr, ttft, e2e, out_tok, phi_t, phi_e, stage_s,
        wall_s=time.perf_counter() - t_wall, steps=len(starts), preemptions=eng.stats.num_preemptions_total,
    )


def _add(eng: Engine, r: _Req, i: int, index: dict[str, int]) -> None:
    rid = f"r{i}"
    index[rid] = i
    eng.add_request(SimRequest(rid, r.prompt, r.max_tokens, arrival=r.arrival))


# ---- errors ---------------------------------------------------------------------------------------------------


def rel_error(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else float("nan")


def _summary(errs: Sequence[float]) -> dict[str, float]:
    a = [abs(e) for e in errs if not math.isnan(e)]
    if not a:
        return {"n": 0}
    return {
        "n": len(a),
        "median_abs_rel_error": float(statistics.median(a)),
        "p90_abs_rel_error": float(np.percentile(a, 90)),
        "mean_abs_rel_error": float(statistics.fmean(a)),
        "max_abs_rel_error": float(max(a)),
    }


def _stage_rows(run: SimRun) -> list[dict[str, Any]]:
    rows = []
    for i, st in enumerate(run.experiment.stages):
        pred = run.metrics(i)
        metrics = {}
        for m in METRICS:
            if m in st.measured and m in pred:
                metrics[m] = {
                    "predicted": round(pred[m], 4),
                    "measured": st.measured[m],
                    "rel_error": round(rel_error(pred[m], st.measured[m]), 5),
                }
        rows.append({
            "stage": i,
            "rate": st.rate,
            "duration_s": st.duration_s,
            "simulated_s": run.stage_seconds[i],
            "requests_simulated": int(pred.get("requests", 0)),
            "metrics": metrics,
        })
    return rows


def loss(runs: Sequence[SimRun]) -> float:
    """RMSE over stages of the absolute percentage errors of TTFT mean, plus the same for E2E mean."""
    out = 0.0
    for m in ("ttft_mean", "e2e_mean"):
        errs = []
        for r in runs:
            for i, st in enumerate(r.experiment.stages):
                p = r.metrics(i)
                if m in st.measured and m in p:
                    errs.append(rel_error(p[m], st.measured[m]))
        if errs:
            out += math.sqrt(statistics.fmean(e * e for e in errs))
    return out


def validate(
    spec: Spec,
    coeffs: RooflineCoefficients,
    *,
    seed: int = 0,
    max_stage_s: float | None = None,
    async_scheduling: bool = True,
) -> dict[str, Any]:
    """Simulate every experiment; the report.json structure."""
    exps = []
    per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
    by_model: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for exp in spec.experiments:
        run = simulate(exp, coeffs, seed=seed, max_stage_s=max_stage_s, async_scheduling=async_scheduling)
        rows = _stage_rows(run)
        for row in rows:
            for m, v in row["metrics"].items():
                per_metric[m].append(v["rel_error"])
                by_model.setdefault(exp.model_name, {}).setdefault(m, []).append(v["rel_error"])
        exps.append({
            "name": exp.name,
            "source": exp.source,
            "model": exp.model_name,
            "gpu": get_gpu(exp.gpu).name,
            "tp": exp.tp,
            "num_gpu_blocks": build_profile(exp, coeffs).num_gpu_blocks,
            "steps": run.steps,
            "preemptions": run.preemptions,
            "sim_wall_s": round(run.wall_s, 2),
            "stages": rows,
        })
        log.info("validated %s in %.1fs", exp.name, run.wall_s)
    return {
        "spec": spec.name,
        "spec_source": spec.source,
        "coefficients": coeffs.to_dict(),
        "settings": {"seed": seed, "max_stage_s": max_stage_s, "async_scheduling": async_scheduling},
        "experiments": exps,
        "summary": {m: _summary(v) for m, v in per_metric.items() if v},
        "by_model": {k: {m: _summary(v) for m, v in d.items()} for k, d in by_model.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in report["summary"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    models = sorted({e["model"] for e in report["experiments"]})
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for ax, m in zip(axes[0], metrics, strict=True):
        lo, hi = math.inf, 0.0
        for e in report["experiments"]:
            for s in e["stages"]:
                v = s["metrics"].get(m)
                if not v:
                    continue
                x, y = v["measured"], v["predicted"]
                ax.scatter([x], [y], color=colors[e["model"]], s=22, label=e["model"])
                lo, hi = min(lo, x, y), max(hi, x, y)
        if hi > 0:
            ax.plot([lo * 0.8, hi * 1.25], [lo * 0.8, hi * 1.25], "k--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
        s = report["summary"][m]
        ax.set_title(f"{m}: median {100 * s['median_abs_rel_error']:.1f} %, p90 {100 * s['p90_abs_rel_error']:.1f} %",
                     fontsize=9)
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=max(1, len(uniq)), fontsize=8)
    fig.suptitle(f"predicted vs measured: {report['spec']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- fit ------------------------------------------------------------------------------------------------------


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    it = 0
    while (~passive).any() and w[~passive].max(initial=-np.inf) > 1e-12 and it < max_iter:
        it += 1
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)
    return x


def _rows(
    runs: Sequence[SimRun], metrics: Sequence[str], max_stage_error: float | None = None
) -> tuple[list[np.ndarray], list[float], list[str]]:
    """Linear rows: predicted metric = row @ coefficient vector, from the current simulated trajectories.

    With ``max_stage_error``, stages whose simulated TTFT or E2E mean is off by more than that (relative) are
    left out: there the trajectory is in another regime (a queue that builds up or not), the linearisation does
    not hold, and its rows would dominate the solve. If that leaves fewer than three stages, all are kept."""
    rows: list[np.ndarray] = []
    ys: list[float] = []
    names: list[str] = []
    keep: list[tuple[SimRun, int]] = []
    for r in runs:
        for i, st in enumerate(r.experiment.stages):
            if not r.stage_mask(i).any():
                continue
            p = r.metrics(i)
            errs = [abs(rel_error(p[m], st.measured[m])) for m in ("ttft_mean", "e2e_mean") if m in st.measured]
            if max_stage_error is None or not errs or max(errs) <= max_stage_error:
                keep.append((r, i))
    if len(keep) < 3:
        keep = [(r, i) for r in runs for i in range(len(r.experiment.stages)) if r.stage_mask(i).any()]
    for r, i in keep:
        st = r.experiment.stages[i]
        m_ok = r.stage_mask(i)
        for m in metrics:
            if m not in st.measured:
                continue
            if m in ("ttft_mean", "e2e_mean"):
                phi = r.phi_ttft if m.startswith("ttft") else r.phi_e2e
                row = phi[m_ok].mean(axis=0)
            elif m in ("ttft_p90", "e2e_p90"):
                phi = r.phi_ttft if m.startswith("ttft") else r.phi_e2e
                vals = (r.ttft if m.startswith("ttft") else r.e2e)[m_ok]
                k = int(np.argsort(vals)[min(len(vals) - 1, int(0.9 * len(vals)))])
                row = phi[m_ok][k]
            else:  # itl_mean
                out = r.out_tokens[m_ok]
                dec = out > 1
                d = (r.phi_e2e[m_ok][dec] - r.phi_ttft[m_ok][dec]) / (out[dec] - 1)[:, None]
                row = d.mean(axis=0)
            rows.append(row * 1000.0)  # ms per unit coefficient
            ys.append(st.measured[m])
            names.append(f"{r.experiment.name}/{i}/{m}")
    return rows, ys, names


def fit(
    spec: Spec,
    start: RooflineCoefficients | None = None,
    *,
    free: Sequence[str] = DEFAULT_FREE,
    metrics: Sequence[str] = ("ttft_mean", "e2e_mean", "itl_mean"),
    iterations: int = 5,
    prior_weight: float = 0.05,
    trust: float | None = 0.5,
    seed: int = 0,
    max_stage_s: float | None = 150.0,
    async_scheduling: bool = True,
    progress: Any = None,
) -> tuple[RooflineCoefficients, list[dict[str, Any]]]:
    """Fit the free coefficients on every experiment of ``spec``; returns the best iterate and the history."""
    c = start or RooflineCoefficients()
    bad = set(free) - set(_COEF_COLUMNS)
    if bad:
        raise ValueError(f"unknown coefficients to fit: {sorted(bad)}; known: {', '.join(_COEF_COLUMNS)}")
    free_idx = [i for i, k in enumerate(_COEF_COLUMNS) if k in free]
    fixed_idx = [i for i, k in enumerate(_COEF_COLUMNS) if k not in free]
    prior = _coef_vector(start or RooflineCoefficients())
    lower = np.array([_LOWER.get(_COEF_COLUMNS[i], 0.0) for i in free_idx])
    history: list[dict[str, Any]] = []

    def evaluate(coef: RooflineCoefficients) -> tuple[float, list[SimRun]]:
        rs = [simulate(e, coef, seed=seed, max_stage_s=max_stage_s, async_scheduling=async_scheduling)
              for e in spec.experiments]
        return loss(rs), rs

    lv, runs = evaluate(c)
    best = (lv, c)
    for it in range(iterations + 1):
        history.append({"iteration": it, "loss": round(lv, 5), "coefficients": c.to_dict()})
        if progress:
            progress(f"fit iteration {it}: loss {lv:.4f} ({', '.join(f'{k}={getattr(c, k):.4g}' for k in free)})")
        if it == iterations:
            break
        rows, ys, names = _rows(runs, metrics, max_stage_error=trust)
        a = np.vstack(rows)
        y = np.asarray(ys)
        w = 1.0 / y
        cv = _coef_vector(c)
        rhs = y - a[:, fixed_idx] @ cv[fixed_idx] - a[:, free_idx] @ lower
        am = a[:, free_idx] * w[:, None]
        bm = rhs * w
        if prior_weight > 0:
            # weak pull toward the prior keeps coefficients the data cannot identify at physical values
            scale = np.where(prior[free_idx] > 0, prior[free_idx], 1.0)
            am = np.vstack([am, np.diag(prior_weight / scale)])
            bm = np.concatenate([bm, prior_weight * (prior[free_idx] - lower) / scale])
        sol = lower + nnls(am, bm)
        # line search along the linearised solution: the trajectories (batch sizes, queueing) move with the
        # coefficients, so a full step can overshoot when a stage is near saturation
        improved = False
        for alpha in (1.0, 0.5, 0.25):
            newv = cv.copy()
            newv[free_idx] = cv[free_idx] + alpha * (sol - cv[free_idx])
            cand = _from_vector(c, newv, c.source)
            cl, cruns = evaluate(cand)
            if progress:
                progress(f"  step {alpha:g}: loss {cl:.4f}")
            if cl < lv:
                c, lv, runs = cand, cl, cruns
                improved = True
                break
        if lv < best[0]:
            best = (lv, c)
        if not improved:
            break
    assert best is not None
    return best[1], history


# ---- CLI ------------------------------------------------------------------------------------------------------


def _load_tables(args: argparse.Namespace) -> None:
    if args.architectures:
        load_architectures(args.architectures)
    if args.gpus:
        load_gpus(args.gpus)


def run_validate(args: argparse.Namespace) -> int:
    try:
        _load_tables(args)
        spec = load_spec(args.spec)
        coeffs = RooflineCoefficients.from_yaml(args.coefficients) if args.coefficients else default_coefficients()
    except (OSError, KeyError, ValueError, yaml.YAMLError) as e:
        print(f"extproc sim validate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = validate(spec, coeffs, seed=args.seed, max_stage_s=args.max_stage_seconds,
                      async_scheduling=not args.no_async_scheduling)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_report(report, out / "report.png")
    for m, s in report["summary"].items():
        print(f"{m:10s} n={s['n']:3d} median {100 * s['median_abs_rel_error']:6.2f} %  p90 "
              f"{100 * s['p90_abs_rel_error']:6.2f} %")
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    try:
        _load_tables(args)
        spec = load_spec(args.spec)
        start = RooflineCoefficients.from_yaml(args.start) if args.start else RooflineCoefficients()
        free = [s.strip() for s in args.free.split(",") if s.strip()]
        metrics = [s.strip() for s in args.metrics.split(",") if s.strip()]
        bad = set(metrics) - set(METRICS)
        if bad:
            raise ValueError(f"unknown metrics {sorted(bad)}; known: {', '.join(METRICS)}")
    except (OSError, KeyError, ValueError, yaml.YAMLError) as e:
        print(f"extproc sim fit: {e}", file=sys.stderr)
        return 2
    try:
        coeffs, history = fit(
            spec, start, free=free, metrics=metrics, iterations=args.iterations, prior_weight=args.prior_weight,
            seed=args.seed, max_stage_s=args.max_stage_seconds, async_scheduling=not args.no_async_scheduling,
            progress=lambda s: print(s, file=sys.stderr),
        )
    except ValueError as e:
        print(f"extproc sim fit: {e}", file=sys.stderr)
        return 2
    models = sorted({e.model_name for e in spec.experiments})
    coeffs = coeffs.replace(source=f"fit on {spec.name} ({', '.join(models)}; {len(spec.experiments)} experiments)")
    doc = {
        "kind": "roofline-coefficients",
        "fitted_on": {"spec": str(args.spec), "models": models, "experiments": [e.name for e in spec.experiments]},
        "settings": {"free": free, "metrics": metrics, "iterations": args.iterations, "seed": args.seed,
                     "max_stage_s": args.max_stage_seconds, "prior_weight": args.prior_weight,
                     "async_scheduling": not args.no_async_scheduling},
        "coefficients": coeffs.to_dict(),
        "history": [{"iteration": h["iteration"], "loss": h["loss"]} for h in history],
    }
    Path(args.out).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={getattr(coeffs, k):.5g}" for k in free))
    return 0

