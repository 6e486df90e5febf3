"""Hot-path cost of predicted-latency routing: features + two batched LightGBM predictions per request.

Prints p50/p99 (µs) for 8, 32 and 128 candidate pods, split into feature building, model prediction (the two
quantile boosters the hot path uses) and the whole ``PredictorService.predict`` (what the scorer pays once per
scheduling cycle), plus the scorer and picker on top, model load time and one full retrain on a 20k-sample
window. Uses the bundled warm-start model. Each figure is given as wall time and as this process's CPU time
(``time.process_time``): on a shared machine the wall p99 mostly measures waiting for a core, the CPU time what
the code itself costs.

    .venv/bin/python benchmarks/predictor_cost.py [--iters 2000] [--model extproc/predictor/data/latency-predictor.json]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint, PodMetrics
from extproc.predictor.features import PodClassCodes, build_matrix
from extproc.predictor.persistence import load_model, resolve_model_path
from extproc.predictor.service import PredictorService, ServiceConfig
from extproc.sim.trainingdata import generate
from extproc.predictor.trainer import TrainerConfig, fit_models
from extproc.scheduling.framework import CycleState, ScoredEndpoint
from extproc.scheduling.plugins.latency import PredictedLatencyScorer
from extproc.scheduling.plugins.slo import SLOAwarePicker

CLASSES = ("llama3-8b-h100", "llama3-8b-a100", "llama3-8b-l40s")


def pods(n: int, rng: random.Random) -> list[Endpoint]:
    out = []
    for i in range(n):
        ep = Endpoint(f"10.{i // 250}.{i % 250}.1:8000", {"pod-class": CLASSES[i % 3]}, ["m"])
        ep.metrics = PodMetrics(waiting=rng.randrange(0, 8), running=rng.randrange(0, 120), kv_usage=rng.random() * 0.6, updated_at=1.0)
        ep.inflight = rng.randrange(0, 60)
        ep.inflight_prefill_tokens = rng.randrange(0, 8000)
        ep.inflight_decode_tokens = rng.randrange(0, 20000)
        if i % 4:  # most pods are streaming: a recent chunk and a measured step interval (step-phase columns)
            ep.last_chunk_ts = time.monotonic() - rng.random() * 0.03
            ep.chunk_interval_s = 0.01 + rng.random() * 0.025
        out.append(ep)
    return out


def pct(samples: list[float]) -> str:
    a = np.asarray(samples) * 1e6
    return f"p50 {np.percentile(a, 50):6.0f} p99 {np.percentile(a, 99):6.0f}"


class Timer:
    """Wall (perf_counter) and CPU (process_time) samples of one section."""

    __slots__ = ("wall", "cpu")

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def __str__(self) -> str:
        return f"wall {pct(self.wall)} | cpu {pct(self.cpu)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--model", default="extproc/predictor/data/latency-predictor.json")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    assert path, f"model {args.model} not found (run `extproc predictor train`)"
    t0 = time.perf_counter()
    model = load_model(path)
    print(f"model load (4 boosters): {(time.perf_counter() - t0) * 1e3:.1f} ms; trees/booster: "
          f"ttft_q {model.ttft_q.num_trees()}, tpot_q {model.tpot_q.num_trees()} (hot path), "
          f"ttft_mean {model.ttft_mean.num_trees()}, tpot_mean {model.tpot_mean.num_trees()}")
    svc = PredictorService(ServiceConfig(mode="thread"))
    svc.install(model, "bench")
    scorer = PredictedLatencyScorer("pl", svc)
    picker = SLOAwarePicker("slo", svc, seed=1)
    rng = random.Random(0)
    req = InferenceRequest("r", "/v1/completions", "completions", "m", "m", {}, 0, "x" * 2400, max_tokens=128,
                           slo_ttft_ms=500.0, slo_tpot_ms=50.0)
    pc, ct = time.perf_counter, time.process_time
    for n in (8, 32, 128):
        eps = pods(n, rng)
        prefix = {e.address: rng.random() for e in eps}
        classes = PodClassCodes(model.pod_classes)
        f_t, p_t, s_t, sp_t = Timer(), Timer(), Timer(), Timer()
        for i in range(args.iters + 100):
            a, a_c = pc(), ct()
            x = build_matrix(req, eps, prefix, classes)
            b, b_c = pc(), ct()
            model.predict(x)
            c, c_c = pc(), ct()
            cycle = CycleState()
            cycle.data["prefix_scores"] = prefix
            svc.predict(cycle, req, eps)
            d, d_c = pc(), ct()
            cycle = CycleState()
            cycle.data["prefix_scores"] = prefix
            scores = scorer.score(cycle, req, eps)
            picker.pick(cycle, req, [ScoredEndpoint(e, s) for e, s in zip(eps, scores)])
            e, e_c = pc(), ct()
            if i >= 100:
                f_t.add(b - a, b_c - a_c)
                p_t.add(c - b, c_c - b_c)
                s_t.add(d - c, d_c - c_c)
                sp_t.add(e - d, e_c - d_c)
        print(f"{n} pods (µs)")
        print(f"  features          {f_t}")
        print(f"  2x quantile pred  {p_t}")
        print(f"  service.predict   {s_t}")
        print(f"  scorer + picker   {sp_t}")
    data = generate(3000, seed=5, classes=PodClassCodes(model.pod_classes))
    reps = int(np.ceil(20000 / len(data)))
    x = np.tile(data.x, (reps, 1))[:20000]
    t = np.tile(data.ttft_ms, reps)[:20000]
    p = np.tile(data.tpot_ms, reps)[:20000]
    cfg = TrainerConfig()
    res = fit_models(x, t, p, cfg)
    print(f"full retrain, 20000 samples, 4 boosters (TTFT {cfg.n_trees}+{cfg.quantile_trees}, TPOT "
          f"{cfg.tpot_trees}+{cfg.tpot_quantile_trees} rounds, 1 thread): {res.seconds:.2f} s")


if __name__ == "__main__":
    main()
