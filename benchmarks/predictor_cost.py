"""Hot-path cost of predicted-latency routing: features + two batched LightGBM predictions per request.

Prints p50/p99 (µs) for 8, 32 and 128 candidate pods, split into feature building, model prediction and the
whole ``PredictorService.predict`` (what the scorer pays once per scheduling cycle), plus the scorer and
picker on top, model load time and one full retrain on a 20k-sample window. Uses the bundled warm-start model.

    .venv/bin/python benchmarks/predictor_cost.py [--iters 2000] [--model models/latency-predictor.json]
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
from extproc.predictor.simdata import generate
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
        out.append(ep)
    return out


def pct(samples: list[float]) -> str:
    a = np.asarray(samples) * 1e6
    return f"p50 {np.percentile(a, 50):7.1f}  p99 {np.percentile(a, 99):7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--model", default="models/latency-predictor.json")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    assert path, f"model {args.model} not found (run `extproc predictor train`)"
    t0 = time.perf_counter()
    model = load_model(path)
    print(f"model load (4 boosters): {(time.perf_counter() - t0) * 1e3:.1f} ms; trees/booster: "
          f"ttft_q {model.ttft_q.num_trees()}, ttft_mean {model.ttft_mean.num_trees()}")
    svc = PredictorService(ServiceConfig(mode="thread"))
    svc.install(model, "bench")
    scorer = PredictedLatencyScorer("pl", svc)
    picker = SLOAwarePicker("slo", svc, seed=1)
    rng = random.Random(0)
    req = InferenceRequest("r", "/v1/completions", "completions", "m", "m", {}, 0, "x" * 2400, max_tokens=128,
                           slo_ttft_ms=500.0, slo_tpot_ms=50.0)
    print(f"{'pods':>5}  {'features (µs)':<28}{'2× predict (µs)':<28}{'service.predict (µs)':<28}{'scorer+picker (µs)':<28}")
    for n in (8, 32, 128):
        eps = pods(n, rng)
        prefix = {e.address: rng.random() for e in eps}
        classes = PodClassCodes(model.pod_classes)
        f_t, p_t, s_t, sp_t = [], [], [], []
        for i in range(args.iters + 100):
            a = time.perf_counter()
            x = build_matrix(req, eps, prefix, classes)
            b = time.perf_counter()
            model.predict(x)
            c = time.perf_counter()
            cycle = CycleState()
            cycle.data["prefix_scores"] = prefix
            svc.predict(cycle, req, eps)
            d = time.perf_counter()
            cycle = CycleState()
            cycle.data["prefix_scores"] = prefix
            scores = scorer.score(cycle, req, eps)
            picker.pick(cycle, req, [ScoredEndpoint(e, s) for e, s in zip(eps, scores)])
            e = time.perf_counter()
            if i >= 100:
                f_t.append(b - a)
                p_t.append(c - b)
                s_t.append(d - c)
                sp_t.append(e - d)
        print(f"{n:>5}  {pct(f_t):<28}{pct(p_t):<28}{pct(s_t):<28}{pct(sp_t):<28}")
    data = generate(3000, seed=5, classes=PodClassCodes(model.pod_classes))
    reps = int(np.ceil(20000 / len(data)))
    x = np.tile(data.x, (reps, 1))[:20000]
    t = np.tile(data.ttft_ms, reps)[:20000]
    p = np.tile(data.tpot_ms, reps)[:20000]
    res = fit_models(x, t, p, TrainerConfig())
    print(f"full retrain, 20000 samples, 4 boosters (100 mean + 50 quantile rounds, 1 thread): {res.seconds:.2f} s")


if __name__ == "__main__":
    main()
