"""The training recipe: point objective, tree counts, the simulator data and the per-regime evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from predictor_helpers import synthetic_samples

from extproc.sim.predictor_cli import evaluate
from extproc.predictor.features import (
    CHUNK_AGE_CAP_MS,
    N_FEATURES,
    SINCE_LAST_CHUNK_MS,
    STEP_GAP_MAX_S,
    STEP_GAP_MIN_S,
    STEP_INTERVAL_MS,
    WAITING,
    PodClassCodes,
)
from extproc.predictor.model import LatencyModel
from extproc.predictor.service import ServiceConfig
from extproc.sim.trainingdata import generate
from extproc.predictor.trainer import TrainerConfig, fit_models


def _skewed(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One regime whose TTFT is 10 ms 70 % of the time and 1000 ms otherwise (median 10, geometric mean ≈ 40)."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, N_FEATURES))
    x[:, 6] = 100.0
    ttft = np.where(rng.random(n) < 0.7, 10.0, 1000.0)
    return x, ttft, np.full(n, 5.0)


def _model(cfg: TrainerConfig, x: np.ndarray, t: np.ndarray, p: np.ndarray) -> LatencyModel:
    res = fit_models(x, t, p, cfg)
    return LatencyModel.from_strings(res.strings, version=1, quantile_alpha=cfg.quantile_alpha, n_samples=res.n_samples, pod_classes={})


def test_l1_point_model_predicts_the_median_and_l2_the_geometric_mean() -> None:
    x, t, p = _skewed(600)
    small = dict(n_trees=30, quantile_trees=10, tpot_trees=5, tpot_quantile_trees=5, min_data_in_leaf=3)
    l1 = _model(TrainerConfig(point_objective="l1", **small), x, t, p).predict_mean(x[:1]).ttft_ms[0]
    l2 = _model(TrainerConfig(point_objective="regression", **small), x, t, p).predict_mean(x[:1]).ttft_ms[0]
    assert l1 == pytest.approx(10.0, rel=0.05)
    assert l2 == pytest.approx(np.exp(0.7 * np.log(10.0) + 0.3 * np.log(1000.0)), rel=0.15)


def test_tree_counts_follow_the_config() -> None:
    x, t, p = synthetic_samples(400)
    cfg = TrainerConfig(n_trees=12, quantile_trees=4, tpot_trees=7, tpot_quantile_trees=3, min_data_in_leaf=3)
    m = _model(cfg, x, t, p)
    assert (m.ttft_mean.num_trees(), m.ttft_q.num_trees()) == (12, 16)
    assert (m.tpot_mean.num_trees(), m.tpot_q.num_trees()) == (7, 10)


def test_config_validation_and_plugin_parameters() -> None:
    with pytest.raises(ValueError):
        TrainerConfig(point_objective="huber")
    with pytest.raises(ValueError):
        TrainerConfig(quantile_learning_rate=0.0)
    cfg = ServiceConfig.from_params({"tpotTrees": 9, "tpotQuantileTrees": 4, "pointObjective": "regression", "quantileLearningRate": 0.2})
    t = cfg.trainer
    assert (t.tpot_trees, t.tpot_quantile_trees, t.point_objective, t.quantile_learning_rate) == (9, 4, "regression", 0.2)
    assert ServiceConfig.from_params({}).trainer == TrainerConfig()


def test_simulated_data_and_per_regime_evaluation() -> None:
    classes = PodClassCodes()
    d = generate(400, seed=3, classes=classes, lora_share=0.2)
    assert len(d) > 300 and d.x.shape == (len(d), N_FEATURES)
    assert d.phase_ms.shape == (len(d),) and (d.phase_ms >= 0).all()
    # the wait for the step in progress is part of the TTFT (the prefill step comes after it)
    assert (d.phase_ms <= d.ttft_ms + 1e-6).all()
    # the step-phase columns are what the gateway saw (last chunk before the decision), not the hidden phase:
    # a pod busy with a step emitted tokens before it, and that last chunk plus the time left in the step in
    # progress is one step's duration, at least the fastest profile's fixed step cost
    since, interval = d.x[:, SINCE_LAST_CHUNK_MS], d.x[:, STEP_INTERVAL_MS]
    assert ((since >= 0) & (since <= CHUNK_AGE_CAP_MS)).all()
    busy = d.phase_ms > 0
    assert busy.any() and (since[busy] < CHUNK_AGE_CAP_MS).mean() > 0.9
    assert (since[busy] + d.phase_ms[busy] > 1.0).all()
    measured = interval[~np.isnan(interval)]
    assert len(measured) > 0.9 * len(d)
    assert ((measured >= STEP_GAP_MIN_S * 1000) & (measured <= STEP_GAP_MAX_S * 1000)).all()
    cfg = TrainerConfig(n_trees=10, quantile_trees=5, tpot_trees=5, tpot_quantile_trees=5, min_data_in_leaf=3)
    m = _model(cfg, d.x, d.ttft_ms, d.tpot_ms)
    ev = evaluate(m, d.x, d.ttft_ms, d.tpot_ms, classes.as_dict())
    base = ev["base_model_requests"]["n"]
    assert ev["base_no_queue"]["n"] + ev["base_queued"]["n"] == base
    assert ev["base_prefix_cached"]["n"] + ev["base_prefix_uncached"]["n"] == base
    assert base + ev["lora_requests"]["n"] == ev["all"]["n"] == len(d)
    assert sum(ev[f"class_{c}"]["n"] for c in classes.as_dict()) == len(d)
    assert ev["base_queued"]["n"] == int(((d.x[:, WAITING] > 0) & (d.x[:, 10] == 0)).sum())
    assert 0.0 <= ev["all"]["ttft_p90_coverage"] <= 1.0 and ev["all"]["ttft_mape"] > 0.0
