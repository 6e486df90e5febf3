"""The predictor really learns online: in virtual time (same observation path as the server), from streaming
and non-streaming traffic, and the service's parameters are given once and take effect."""

from __future__ import annotations

import pytest

import extproc.scheduling.plugins.latency  # noqa: F401  (registers the predictor plugins)
import extproc.scheduling.plugins.slo  # noqa: F401
from extproc.bench.setups import SETUPS
from extproc.bench.virtual import layout, run_virtual
from extproc.bench.workloads import Stage, generate
from extproc.datalayer.endpoint import EndpointPool
from extproc.predictor.persistence import BUNDLED_MODEL
from extproc.predictor.service import RUNTIME_KEY, SERVICE_KEY, WARM_START_KEY, PredictorRuntime
from extproc.scheduling.config import ConfigError, build_config


def _het(rate: float = 16.0, seconds: float = 25.0, seed: int = 0):  # type: ignore[no-untyped-def]
    return generate("heterogeneous", [Stage(rate, seconds)], seed=seed)


def test_virtual_cold_start_trains_and_counts_fallbacks() -> None:
    wl = _het()
    fl = layout("llama3-8b-h100:2,llama3-8b-l40s:2")
    vr = run_virtual(wl, SETUPS["extproc-predicted"], fl, seed=0)
    p = vr.extra["predictor"]
    assert p["warm_start"] is None
    assert p["samples_trained"] == len(wl.requests)  # every completion reached the trainer
    assert p["retrains"] >= 1 and p["model_version"] == p["retrains"]
    assert p["decisions"] == len(wl.requests)
    # cold: the first minSamples (200) decisions fall back; once a model is live they stop
    assert 200 <= p["fallback_decisions"] < p["decisions"]
    assert p["online_ttft_mape"] is not None and p["online_ttft_mape"] < 0.5
    assert p["curve"] and p["curve"][-1][1] is not None
    # deterministic: the same seed retrains on the same schedule and routes the same way
    again = run_virtual(wl, SETUPS["extproc-predicted"], fl, seed=0)
    assert [r.pod for r in again.results] == [r.pod for r in vr.results]
    assert again.extra["predictor"]["retrains"] == p["retrains"]


def test_warm_start_flag_loads_the_file() -> None:
    wl = _het(seconds=3.0)
    vr = run_virtual(wl, SETUPS["extproc-predicted"], layout("llama3-8b-h100:1,llama3-8b-l40s:1"), seed=0, warm_start=BUNDLED_MODEL)
    p = vr.extra["predictor"]
    assert p["warm_start"] == BUNDLED_MODEL and p["fallback_decisions"] == 0 and p["decisions"] == len(wl.requests)


def test_non_streaming_traffic_trains_the_model() -> None:
    wl = _het()
    vr = run_virtual(wl, SETUPS["extproc-predicted"], layout("llama3-8b-h100:2,llama3-8b-l40s:2"), seed=1, stream=False)
    p = vr.extra["predictor"]
    assert p["samples_trained"] == p["nonstream_samples"] == len(wl.requests)
    assert p["retrains"] >= 1
    assert p["fallback_decisions"] < p["decisions"]
    assert p["online_ttft_mape"] is None  # no streaming request: TTFT/TPOT were never observable
    assert p["nonstream_e2e_mape"] is not None  # the TTFT head predicted the E2E of non-streaming requests
    assert all(r.ok and r.ttft_ms == r.e2e_ms for r in vr.results)


def _cfg(plugins: list[dict], services: dict | None = None):  # type: ignore[no-untyped-def]
    raw = {
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": p.get("name", p["type"])} for p in plugins]}],
    }
    pool = EndpointPool(default_models=frozenset({"m"}))
    pool.set_endpoints(["10.0.0.1:8000"])
    return build_config(raw, pool, services if services is not None else {}, "test.yaml")


def test_parameters_of_the_owning_plugin_apply_even_when_listed_second() -> None:
    services: dict = {}
    cfg = _cfg(
        [
            {"type": "slo-admission"},  # built first, sets nothing
            {"type": "predicted-latency-scorer", "parameters": {"warmStart": "", "minSamples": 40, "trees": 7, "retrainEvery": 1000}},
            {"type": "slo-aware-picker"},
        ],
        services,
    )
    svc = services[SERVICE_KEY]
    assert all(getattr(p, "service", svc) is svc for p in cfg.plugins.values())
    assert svc.owner == "predicted-latency-scorer"
    assert svc.model is None  # warmStart "" → cold, the bundled model is not loaded
    assert svc.cfg.trainer.min_samples == 40 and svc.cfg.trainer.n_trees == 7


def test_min_samples_and_trees_take_effect_in_training() -> None:
    services_params = {"warmStart": "", "minSamples": 40, "trees": 7, "quantileTrees": 3, "retrainEvery": 10_000,
                       "retrainIntervalSeconds": 1000.0}
    # the predicted-latency profile with these parameters, through the virtual runner's services hooks
    import yaml

    from extproc.scheduling.config import builtin_config_path

    raw = yaml.safe_load(open(builtin_config_path("predicted-latency"), encoding="utf-8"))
    for spec in raw["plugins"]:
        if spec["type"] == "predicted-latency-scorer":
            spec["parameters"].update(services_params)
    pool = EndpointPool(default_models=frozenset({"m"}))
    pool.set_endpoints(["10.0.0.1:8000"])
    now = [0.0]
    services: dict = {RUNTIME_KEY: PredictorRuntime(clock=lambda: now[0])}
    build_config(raw, pool, services, "p.yaml")
    svc = services[SERVICE_KEY]
    assert svc.model is None and svc.cfg.trainer.min_samples == 40
    svc.start_sync()
    import numpy as np

    from extproc.predictor.features import N_FEATURES, STREAM

    rng = np.random.default_rng(0)
    x = rng.random((39, N_FEATURES))
    x[:, STREAM] = 1.0
    svc.trainer.submit(x, 10.0 + 100.0 * x[:, 1], 5.0 + x[:, 0])
    assert svc.model is None  # 39 < minSamples
    svc.trainer.submit(x[:1], np.array([20.0]), np.array([6.0]))
    assert svc.model is not None and svc.stats()["retrains"] == 1  # the 40th sample trains (inline trainer)
    assert svc.model.ttft_mean.num_trees() == 7 and svc.model.ttft_q.num_trees() == 7 + 3
    svc.stop_sync()


def test_conflicting_predictor_parameters_name_both_plugins() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(
            [
                {"type": "predicted-latency-scorer", "parameters": {"minSamples": 50}},
                {"type": "slo-admission", "parameters": {"minSamples": 80}},
            ]
        )
    msg = str(e.value)
    assert "predicted-latency-scorer" in msg and "slo-admission" in msg and "minSamples" in msg
    # the same parameters twice are fine
    _cfg([{"type": "predicted-latency-scorer", "parameters": {"minSamples": 50}}, {"type": "slo-admission", "parameters": {"minSamples": 50}}])


def test_warm_start_override_from_services() -> None:
    services: dict = {WARM_START_KEY: ""}
    _cfg([{"type": "predicted-latency-scorer"}], services)
    assert services[SERVICE_KEY].model is None
    services = {WARM_START_KEY: "builtin"}
    _cfg([{"type": "predicted-latency-scorer", "parameters": {"warmStart": ""}}], services)
    assert services[SERVICE_KEY].model is not None and services[SERVICE_KEY].warm_start_loaded == "builtin"
