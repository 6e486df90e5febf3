from __future__ import annotations

import math

from predictor_helpers import make_endpoint, make_request, synthetic_law
from prometheus_client import REGISTRY

from extproc.predictor.model import LatencyModel
from extproc.predictor.service import FeatureRow, PredictorService, RollingAccuracy, ServiceConfig
from extproc.scheduling.framework import CycleState, Observation


def test_rolling_accuracy_window() -> None:
    acc = RollingAccuracy(2)
    assert math.isnan(acc.mape) and math.isnan(acc.coverage)
    acc.add(100.0, 110.0, 120.0)  # 10 % error, covered
    acc.add(100.0, 70.0, 90.0)  # 30 % error, not covered
    assert abs(acc.mape - 0.2) < 1e-9 and acc.coverage == 0.5
    acc.add(100.0, 100.0, 150.0)  # evicts the first
    assert abs(acc.mape - 0.15) < 1e-9 and acc.coverage == 0.5 and acc.count == 2


def _observe(svc: PredictorService, ep_waiting: int, ttft_scale: float) -> None:
    cycle = CycleState()
    eps = [make_endpoint("10.0.0.1:8000", waiting=ep_waiting, kv=0.3)]
    svc.predict(cycle, make_request(), eps)
    row: FeatureRow = cycle.data["predictor_features"]["10.0.0.1:8000"]
    t, p = synthetic_law(row.values.reshape(1, -1))
    ttft, tpot = float(t[0]) * ttft_scale, float(p[0])
    obs = Observation("r", "10.0.0.1:8000", "m", 100, dispatch_ts=10.0, first_token_ts=10.0 + ttft / 1000.0,
                      complete_ts=10.0 + (ttft + 10 * tpot) / 1000.0, output_tokens=11, status=200, features=row)
    assert svc.observe(obs)


def test_online_accuracy_gauges_move(small_model: LatencyModel) -> None:
    svc = PredictorService(ServiceConfig(mode="thread", accuracy_window=50))
    svc.install(small_model, "test")
    for w in range(6):
        _observe(svc, w, 1.0)
    good = REGISTRY.get_sample_value("extproc_predictor_ttft_mape")
    assert good is not None and good < 0.15
    assert svc.stats()["accuracy_samples"] == 6
    assert REGISTRY.get_sample_value("extproc_predictor_ttft_p90_coverage") is not None
    assert 0.0 <= REGISTRY.get_sample_value("extproc_predictor_tpot_p90_coverage") <= 1.0  # type: ignore[operator]
    # the fleet slows down 3× → the mean-model error jumps and the quantile stops covering
    for w in range(6):
        _observe(svc, w, 3.0)
    assert REGISTRY.get_sample_value("extproc_predictor_ttft_mape") > good + 0.2  # type: ignore[operator]
    assert svc.ttft_acc.coverage <= 0.6


def test_failed_or_featureless_observations_are_not_used(small_model: LatencyModel) -> None:
    svc = PredictorService(ServiceConfig(mode="thread"))
    assert not svc.observe(Observation("r", "a:1", "m", 1, dispatch_ts=1.0, first_token_ts=1.1, features=None))
    cycle = CycleState()
    svc.predict(cycle, make_request(), [make_endpoint("10.0.0.1:8000")])
    row = cycle.data["predictor_features"]["10.0.0.1:8000"]
    assert not svc.observe(Observation("r", "a:1", "m", 1, dispatch_ts=1.0, first_token_ts=1.1, status=503, features=row))
    assert not svc.observe(Observation("r", "a:1", "m", 1, dispatch_ts=1.0, features=row))  # no first token
    assert svc.observe(Observation("r", "a:1", "m", 1, dispatch_ts=1.0, first_token_ts=1.1, status=200, features=row))
