from __future__ import annotations

import extproc.scheduling.plugins.latency  # noqa: F401  (registers the predictor plugins)
import extproc.scheduling.plugins.slo  # noqa: F401
from predictor_helpers import make_endpoint, make_request

from extproc.datalayer.endpoint import EndpointPool
from extproc.predictor.service import FeatureRow, PredictorService
from extproc.scheduling.config import load_config
from extproc.scheduling.framework import Observation


def test_predicted_latency_profile_schedules_and_feeds_the_trainer() -> None:
    pool = EndpointPool(default_models=frozenset({"m"}))
    pool.set_endpoints(["10.0.0.1:8000", "10.0.0.2:8000"], {"10.0.0.1:8000": {"pod-class": "llama3-8b-h100"}})
    for ep, w in zip(pool.snapshot(), (0, 9)):
        src = make_endpoint(ep.address, waiting=w, running=4, kv=0.2)
        ep.metrics = src.metrics
    services: dict = {}
    cfg = load_config("predicted-latency", pool, services)
    svc = next(p.service for p in cfg.plugins.values() if hasattr(p, "service"))
    assert isinstance(svc, PredictorService) and svc.cfg.mode == "process"
    assert svc.model is not None and svc.model_source == "warm-start"  # the bundled simulator model
    names = [type(p).__name__ for p in cfg.scheduler.profiles["default"].filters]
    assert names[-1] == "SLOAdmission"
    result, cycle = cfg.scheduler.schedule(make_request(tokens=300))
    assert result.primary.address == "10.0.0.1:8000"  # 9 waiting vs none
    assert cycle.data["slo_tier"] == "no_slo"
    assert set(cycle.data["predicted_ttft_ms"]) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    row = cycle.data["predictor_features"][result.primary.address]
    assert isinstance(row, FeatureRow)
    obs = Observation("r1", result.primary.address, "m", 300, dispatch_ts=5.0, first_token_ts=5.05, complete_ts=5.5,
                      output_tokens=20, status=200, features=row)
    cfg.scheduler.completed(make_request(), obs)
    assert svc.stats()["samples"] == 1 and svc.stats()["accuracy_samples"] == 1
