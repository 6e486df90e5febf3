from __future__ import annotations

import threading

import numpy as np
from predictor_helpers import SMALL, make_endpoint, make_request, synthetic_samples
from prometheus_client import REGISTRY

from extproc.predictor.features import KV_USAGE, N_FEATURES, WAITING
from extproc.predictor.model import LatencyModel
from extproc.predictor.service import FeatureRow, PredictorService, ServiceConfig
from extproc.predictor.trainer import SampleWindow, TrainerConfig, TrainerCore, bucket_keys
from extproc.scheduling.framework import CycleState, Observation


def test_bucketed_window_keeps_rare_regimes() -> None:
    w = SampleWindow(cap=10)
    common = np.zeros((500, N_FEATURES))  # idle pods: one bucket
    rare = np.zeros((3, N_FEATURES))
    rare[:, WAITING] = 40
    rare[:, KV_USAGE] = 0.93
    w.add(rare, np.full(3, 900.0), np.full(3, 40.0))
    w.add(common, np.full(500, 20.0), np.full(500, 5.0))
    x, t, _ = w.arrays()
    assert len(w) == 13 and w.n_buckets == 2
    assert (t == 900.0).sum() == 3  # 500 common samples did not push the rare ones out


def test_window_rejects_unusable_rows() -> None:
    w = SampleWindow(cap=10)
    n = w.add(np.zeros((3, N_FEATURES)), np.array([10.0, 0.0, np.nan]), np.array([1.0, 1.0, 1.0]))
    assert n == 1 and len(w) == 1


def test_bucket_keys_separate_waiting_kv_and_prefix() -> None:
    x = np.zeros((4, N_FEATURES))
    x[1, WAITING] = 3
    x[2, KV_USAGE] = 0.5
    x[3, 7] = 0.9
    assert len(set(bucket_keys(x).tolist())) == 4


def test_core_retrains_after_k_new_samples() -> None:
    core = TrainerCore(TrainerConfig(min_samples=20, retrain_every=30, retrain_interval_s=3600, n_trees=5, min_data_in_leaf=2))
    x, t, p = synthetic_samples(15)
    core.add(x, t, p)
    assert not core.due()  # fewer than min_samples
    x, t, p = synthetic_samples(10, seed=2)
    core.add(x, t, p)
    assert core.due()  # the first model: as soon as min_samples are held, whatever retrain_every says
    core.train()
    x, t, p = synthetic_samples(25, seed=3)
    core.add(x, t, p)
    assert not core.due()  # then every retrain_every new samples
    x, t, p = synthetic_samples(10, seed=1)
    core.add(x, t, p)
    assert core.due()
    res = core.train()
    assert set(res.strings) == {"ttft_q", "ttft_mean", "tpot_q", "tpot_mean"} and res.n_samples == 60
    assert not core.due()


def _feed(svc: PredictorService, n: int, seed: int) -> None:
    x, t, p = synthetic_samples(n, seed)
    for i in range(n):
        obs = Observation(f"r{i}", "10.0.0.1:8000", "m", 10, dispatch_ts=1.0, first_token_ts=1.0 + t[i] / 1000.0,
                          complete_ts=1.0 + t[i] / 1000.0 + 9 * p[i] / 1000.0, output_tokens=10, status=200,
                          features=FeatureRow(x[i], None, float("nan"), float("nan")))
        assert svc.observe(obs)
    svc.flush()


def _wait_for_version(svc: PredictorService, version: int, event: threading.Event, timeout: float = 60.0) -> None:
    while (svc.model.version if svc.model else 0) < version:
        event.clear()
        assert event.wait(timeout), "no model arrived from the trainer"


def _run_service_training(mode: str) -> None:
    svc = PredictorService(ServiceConfig(trainer=SMALL, mode=mode, batch_size=1000))
    arrived = threading.Event()
    orig = svc._install

    def install(model: LatencyModel, source: str) -> None:
        orig(model, source)
        arrived.set()

    svc._install = install  # type: ignore[method-assign]
    before = REGISTRY.get_sample_value("extproc_predictor_retrains_total") or 0.0
    svc.start_sync()
    try:
        assert svc.model is None
        _feed(svc, 200, seed=3)
        _wait_for_version(svc, 1, arrived)
        first = svc.model
        assert first is not None and first.version == 1 and svc.model_source == "online"
        # the model learnt the synthetic law: more waiting → higher predicted TTFT
        eps = [make_endpoint("10.0.0.1:8000", waiting=0), make_endpoint("10.0.0.2:8000", waiting=8)]
        ps = svc.predict(CycleState(), make_request(), eps)
        assert ps.prediction is not None and ps.prediction.ttft_ms[1] > 2 * ps.prediction.ttft_ms[0]
        # atomic swap: a new model replaces the object; the old one stays usable by whoever holds it
        _feed(svc, 100, seed=4)
        svc.request_train()
        _wait_for_version(svc, 2, arrived)
        assert svc.model is not first and svc.model.version == 2
        assert first.predict(ps.matrix).ttft_ms.shape == (2,)
        assert (REGISTRY.get_sample_value("extproc_predictor_retrains_total") or 0.0) >= before + 2
        assert REGISTRY.get_sample_value("extproc_predictor_model_version") == 2
    finally:
        svc.stop_sync()
    assert svc.trainer is None


def test_process_trainer_trains_and_swaps_model() -> None:
    _run_service_training("process")


def test_thread_trainer_trains_and_swaps_model() -> None:
    _run_service_training("thread")
