"""Shared helpers for the predictor tests: endpoints, requests, and a small real model trained on a synthetic
latency law (TTFT = 20 ms × (1 + waiting), TPOT = 5 ms + 50 ms × KV use)."""

from __future__ import annotations

import numpy as np


from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint, PodMetrics
from extproc.predictor.features import KV_USAGE, N_FEATURES, WAITING, PodClassCodes
from extproc.predictor.model import LatencyModel
from extproc.predictor.trainer import TrainerConfig, fit_models


def make_endpoint(addr: str, *, waiting: int = 0, running: int = 0, kv: float = 0.0, pod_class: str = "default", inflight: int = 0) -> Endpoint:
    ep = Endpoint(addr, {"pod-class": pod_class}, ["m"])
    ep.metrics = PodMetrics(waiting=waiting, running=running, kv_usage=kv, updated_at=1.0)
    ep.inflight = inflight
    return ep


def make_request(*, tokens: int = 100, max_tokens: int | None = 64, slo_ttft: float | None = None, slo_tpot: float | None = None, priority: int = 0, model: str = "m", stream: bool = True) -> InferenceRequest:
    return InferenceRequest(
        request_id="r1",
        path="/v1/completions",
        api="completions",
        model=model,
        target_model=model,
        body={},
        body_size=0,
        prompt_text="x" * (tokens * 4),
        max_tokens=max_tokens,
        priority=priority,
        slo_ttft_ms=slo_ttft,
        slo_tpot_ms=slo_tpot,
        stream=stream,
    )


def synthetic_law(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 20.0 * (1.0 + x[:, WAITING]), 5.0 + 50.0 * x[:, KV_USAGE]


def synthetic_samples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, N_FEATURES))
    x[:, WAITING] = rng.integers(0, 12, n)
    x[:, KV_USAGE] = rng.random(n)
    x[:, 2] = rng.integers(0, 50, n)
    x[:, 6] = rng.integers(10, 2000, n)
    x[:, 11] = 64
    t, p = synthetic_law(x)
    return x, t, p


# The plugin tests compare min-max normalised predictions of a noise-free law, so the fixture model is pinned to
# the L2 recipe (which fits a noise-free law exactly) rather than following the production defaults.
SMALL = TrainerConfig(
    min_samples=50,
    retrain_every=50,
    retrain_interval_s=0.2,
    n_trees=40,
    quantile_trees=50,
    tpot_trees=40,
    tpot_quantile_trees=50,
    learning_rate=0.1,
    quantile_learning_rate=0.1,
    point_objective="regression",
    min_data_in_leaf=3,
)



def train_small_model() -> LatencyModel:
    x, t, p = synthetic_samples(1500)
    res = fit_models(x, t, p, SMALL)
    return LatencyModel.from_strings(res.strings, version=7, quantile_alpha=0.9, n_samples=res.n_samples, pod_classes=PodClassCodes().as_dict())
