from __future__ import annotations

import json
import os

import numpy as np
import pytest
from predictor_helpers import make_endpoint, make_request, synthetic_samples

from extproc.predictor.model import LatencyModel
from extproc.predictor.persistence import load_initial_model, load_model, save_model, state_model_path
from extproc.predictor.service import PredictorService, ServiceConfig
from extproc.predictor.trainer import WINDOW_FILE, SampleWindow
from extproc.scheduling.framework import CycleState


def test_save_load_round_trip_predicts_identically(tmp_path, small_model: LatencyModel) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "sub" / "m.json"
    save_model(small_model, path)
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temporary file left behind
    loaded = load_model(path)
    assert loaded.version == small_model.version and loaded.quantile_alpha == 0.9
    x, _, _ = synthetic_samples(20, seed=9)
    np.testing.assert_allclose(loaded.predict(x).ttft_ms, small_model.predict(x).ttft_ms)
    np.testing.assert_allclose(loaded.predict_mean(x).tpot_ms, small_model.predict_mean(x).tpot_ms)


def test_load_rejects_foreign_or_mismatched_files(tmp_path, small_model: LatencyModel) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError):
        load_model(bad)
    d = small_model.to_dict()
    d["feature_names"] = ["a", "b"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError):
        load_model(bad)
    # a broken state file is skipped in favour of the warm-start file, never fatal
    state = tmp_path / "state"
    state.mkdir()
    (state / "latency-predictor.json").write_text("{not json")
    good = tmp_path / "good.json"
    save_model(small_model, good)
    model, source = load_initial_model(str(state), str(good))
    assert model is not None and source == "warm-start"
    assert load_initial_model(str(tmp_path / "none"), None) == (None, "none")


def test_restart_is_warm(tmp_path, small_model: LatencyModel) -> None:  # type: ignore[no-untyped-def]
    state = str(tmp_path / "state")
    svc = PredictorService(ServiceConfig(mode="thread", state_dir=state))
    assert svc.model is None
    svc.install(small_model, "online")
    assert svc.save() == state_model_path(state)
    svc.stop_sync()

    again = PredictorService(ServiceConfig(mode="thread", state_dir=state, warm_start=None))
    assert again.model is not None and again.model.version == small_model.version and again.model_source == "state"
    cycle = CycleState()
    ps = again.predict(cycle, make_request(), [make_endpoint("10.0.0.1:8000"), make_endpoint("10.0.0.2:8000", waiting=8)])
    assert ps.prediction is not None and ps.prediction.ttft_ms[1] > ps.prediction.ttft_ms[0]


def test_window_persists_across_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = SampleWindow(cap=50)
    x, t, p = synthetic_samples(40)
    w.add(x, t, p)
    path = str(tmp_path / WINDOW_FILE)
    w.save(path)
    assert sorted(os.listdir(tmp_path)) == [WINDOW_FILE]
    w2 = SampleWindow(cap=50)
    assert w2.load(path) == 40
    np.testing.assert_allclose(np.sort(w2.arrays()[1]), np.sort(t))


def test_bundled_warm_start_model_loads() -> None:
    model, source = load_initial_model(None, "builtin")  # package data, in the wheel and the image
    assert source == "warm-start" and model is not None
    assert model.metadata.get("source") == "simulator"
    # keyed on the hardware a pod exposes, and it never saw the MI300X / Gaudi 3 pods of three-vendor
    assert set(model.pod_classes) == {"H100-SXM-80GB", "A100-SXM-80GB", "L40S-48GB"}
