from __future__ import annotations

from collections import Counter as Tally

import pytest
from predictor_helpers import make_endpoint, make_request
from prometheus_client import REGISTRY

from extproc.datalayer.endpoint import EndpointPool
from extproc.predictor.model import LatencyModel
from extproc.predictor.service import PredictorService, ServiceConfig
from extproc.scheduling.framework import CycleState, ScoredEndpoint, SchedulingError
from extproc.scheduling.plugins.latency import PredictedLatencyScorer
from extproc.scheduling.plugins.slo import SLOAdmission, SLOAwarePicker
from extproc.scheduling.registry import PluginContext


def _fallback_count(reason: str = "no_model") -> float:
    return REGISTRY.get_sample_value("extproc_predictor_fallback_total", {"reason": reason}) or 0.0


def _service(model: LatencyModel | None) -> PredictorService:
    svc = PredictorService(ServiceConfig(mode="thread"))
    if model is not None:
        svc.install(model, "test")
    return svc


def _pods() -> list:
    # synthetic law: TTFT = 20 ms × (1 + waiting) → A ≈ 20, B ≈ 60, C ≈ 220 ms
    return [
        make_endpoint("10.0.0.1:8000", waiting=0, running=3, inflight=3),
        make_endpoint("10.0.0.2:8000", waiting=2, running=5, inflight=5),
        make_endpoint("10.0.0.3:8000", waiting=10, running=9, inflight=9),
    ]


def test_cold_start_gives_neutral_scores_and_counts_fallback() -> None:
    svc = _service(None)
    scorer = PredictedLatencyScorer("pl", svc)
    picker = SLOAwarePicker("slo", svc, seed=1, no_slo_policy="latency")
    before = _fallback_count()
    cycle = CycleState()
    pods = _pods()
    scores = scorer.score(cycle, make_request(), pods)
    assert list(scores) == [0.0, 0.0, 0.0]
    assert _fallback_count() == before + 1
    # the features are still published (so cold-start traffic trains the first model)
    assert set(cycle.data["predictor_features"]) == {p.address for p in pods}
    assert "predicted_ttft_ms" not in cycle.data
    # the picker follows the heuristic scores, and the decision is counted once
    scored = [ScoredEndpoint(p, s) for p, s in zip(pods, [0.2, 0.9, 0.5])]
    assert picker.pick(cycle, make_request(), scored) == [pods[1]]
    assert cycle.data["slo_tier"] == "fallback"
    assert _fallback_count() == before + 1


def test_scorer_prefers_lower_predicted_latency(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    cycle = CycleState()
    pods = _pods()
    scores = PredictedLatencyScorer("pl", svc).score(cycle, make_request(), pods)
    assert max(scores) == scores[0] and scores[2] < 0.1  # TTFT dominates the 0.8/0.2 blend
    assert scores[0] > scores[1] > scores[2]
    t = cycle.data["predicted_ttft_ms"]
    assert t["10.0.0.1:8000"] < t["10.0.0.2:8000"] < t["10.0.0.3:8000"]
    assert t["10.0.0.3:8000"] > 100


def test_predictor_failure_falls_back_without_failing(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    broken = LatencyModel.from_strings(dict(small_model.model_strings), version=99, quantile_alpha=0.9, n_samples=1, pod_classes={})
    object.__setattr__(broken, "ttft_q", None)  # predict() now raises AttributeError
    svc.install(broken, "test")
    before = _fallback_count("error")
    cycle = CycleState()
    pods = _pods()
    assert list(PredictedLatencyScorer("pl", svc).score(cycle, make_request(), pods)) == [0.0] * 3
    assert _fallback_count("error") == before + 1
    scored = [ScoredEndpoint(p, s) for p, s in zip(pods, [0.1, 0.2, 0.7])]
    assert SLOAwarePicker("slo", svc).pick(cycle, make_request(slo_ttft=100), scored) == [pods[2]]


def _picks(svc: PredictorService, req, pods, n: int = 300, **kw) -> Tally:  # type: ignore[no-untyped-def]
    picker = SLOAwarePicker("slo", svc, seed=7, **kw)
    tally: Tally = Tally()
    tiers: Tally = Tally()
    for _ in range(n):
        cycle = CycleState()
        PredictedLatencyScorer("pl", svc).score(cycle, req, pods)
        out = picker.pick(cycle, req, [ScoredEndpoint(p, 0.0) for p in pods])
        tally[out[0].address] += 1
        tiers[cycle.data["slo_tier"]] += 1
    tally["tiers"] = tiers  # type: ignore[assignment]
    return tally


def test_slo_positive_tier_best_fit(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    pods = _pods()
    t = _picks(svc, make_request(slo_ttft=120), pods, positive_probability=1.0)
    # A and B meet 120 ms, C does not; B has the least headroom and is favoured
    assert t["10.0.0.3:8000"] == 0
    assert t["10.0.0.2:8000"] > t["10.0.0.1:8000"] > 0
    assert t["tiers"] == {"positive": 300}


def test_slo_exploration_draw_uses_the_negative_tier(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    t = _picks(svc, make_request(slo_ttft=120), _pods(), n=200, positive_probability=0.0)
    assert t["10.0.0.3:8000"] == 200 and t["tiers"] == {"negative": 200}


def test_slo_unattainable_picks_least_bad_or_idle(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    pods = _pods()
    t = _picks(svc, make_request(slo_ttft=5), pods, n=50)
    assert t["10.0.0.1:8000"] == 50 and t["tiers"] == {"negative": 50}
    idle = make_endpoint("10.0.0.4:8000", waiting=1)  # nothing running or in flight, but one waiting → not idle
    idle2 = make_endpoint("10.0.0.5:8000", waiting=0)
    t = _picks(svc, make_request(slo_ttft=5), [pods[1], idle, idle2], n=20)
    assert t["10.0.0.5:8000"] == 20 and t["tiers"] == {"idle": 20}


def test_no_slo_picks_lowest_predicted_latency_and_fallbacks(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    pods = _pods()
    cycle = CycleState()
    PredictedLatencyScorer("pl", svc).score(cycle, make_request(), pods)
    out = SLOAwarePicker("slo", svc, max_endpoints=3, no_slo_policy="latency").pick(cycle, make_request(), [ScoredEndpoint(p, 0.0) for p in pods])
    assert [e.address for e in out] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert cycle.data["slo_tier"] == "no_slo"


def test_prefix_affinity_gate(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    pods = _pods()
    req = make_request()
    for ratio, expect in ((2.0, "10.0.0.1:8000"), (5.0, "10.0.0.2:8000")):
        cycle = CycleState()
        cycle.data["prefix_scores"] = {"10.0.0.2:8000": 0.9, "10.0.0.3:8000": 0.95}
        PredictedLatencyScorer("pl", svc).score(cycle, req, pods)
        out = SLOAwarePicker("slo", svc, affinity_ratio=ratio, no_slo_policy="latency").pick(cycle, req, [ScoredEndpoint(p, 0.0) for p in pods])
        # B (≈ 60 ms vs best ≈ 20 ms) is kept only when the allowed TTFT ratio exceeds 3; C (≈ 11×) never
        assert out[0].address == expect


def test_admission_sheds_only_sheddable_requests(small_model: LatencyModel) -> None:
    svc = _service(small_model)
    adm = SLOAdmission("adm", svc)
    pods = _pods()
    before = REGISTRY.get_sample_value("extproc_predictor_slo_shed_total") or 0.0
    with pytest.raises(SchedulingError) as ei:
        adm.filter(CycleState(), make_request(slo_ttft=5, priority=-1), pods)
    assert ei.value.status == 429 and ei.value.code == "slo_unattainable"
    assert REGISTRY.get_sample_value("extproc_predictor_slo_shed_total") == before + 1
    # not sheddable → admitted; attainable → admitted; no SLO → admitted
    assert adm.filter(CycleState(), make_request(slo_ttft=5, priority=0), pods) == pods
    assert adm.filter(CycleState(), make_request(slo_ttft=100, priority=-1), pods) == pods
    assert adm.filter(CycleState(), make_request(priority=-1), pods) == pods
    with pytest.raises(SchedulingError):
        adm.filter(CycleState(), make_request(slo_tpot=0.5, priority=-2), pods)


def test_admission_without_model_admits() -> None:
    adm = SLOAdmission("adm", _service(None))
    pods = _pods()
    assert adm.filter(CycleState(), make_request(slo_ttft=1, priority=-1), pods) == pods


def test_plugins_share_one_service_through_the_context() -> None:
    ctx = PluginContext(pool=EndpointPool(), services={})
    s = PredictedLatencyScorer.from_config("pl", {"warmStart": "", "trainer": "thread"}, ctx)
    p = SLOAwarePicker.from_config("slo", {"seed": 3}, ctx)
    a = SLOAdmission.from_config("adm", {}, ctx)
    assert s.service is p.service is a.service is ctx.services["predictor"]
    with pytest.raises(ValueError):
        SLOAwarePicker.from_config("slo2", {"positiveTierProbabilty": 0.5}, ctx)


def test_no_slo_score_policy_follows_weighted_total(small_model: LatencyModel) -> None:
    """Default policy: without SLO headers the highest weighted total wins (predicted latency is one term)."""
    svc = _service(small_model)
    pods = _pods()
    picker = SLOAwarePicker("slo", svc, seed=3)
    cycle = CycleState()
    scored = [ScoredEndpoint(p, s) for p, s in zip(pods, [0.1, 0.3, 2.5])]
    assert picker.pick(cycle, make_request(), scored) == [pods[2]]
    assert cycle.data["slo_tier"] == "no_slo"
    with pytest.raises(ValueError):
        SLOAwarePicker("slo", svc, no_slo_policy="fastest")


def test_cold_start_step_time_ranks_by_measured_speed_and_load() -> None:
    # coldStart: step-time (the default): no model yet, so the decision is a counted fallback, but the scorer ranks
    # pods by measured step time x (in flight + 1) instead of returning neutral scores.
    svc = _service(None)
    scorer = PredictedLatencyScorer("pl", svc)
    fast = make_endpoint("10.0.0.1:8000", inflight=3)  # 20 ms x 4 = 80
    slow = make_endpoint("10.0.0.2:8000", inflight=1)  # 60 ms x 2 = 120
    busy = make_endpoint("10.0.0.3:8000", inflight=9)  # 20 ms x 10 = 200
    new = make_endpoint("10.0.0.4:8000", inflight=0)  # never streamed: fastest measured (20 ms) x 1 = 20
    for ep, step_s in ((fast, 0.020), (slow, 0.060), (busy, 0.020)):
        ep.set_chunk_timing(1.0, step_s)
    before = _fallback_count()
    cycle = CycleState()
    scores = scorer.score(cycle, make_request(), [fast, slow, busy, new])
    assert _fallback_count() == before + 1
    assert cycle.data["predictor_fallback"] == "no_model"
    assert scores[3] == pytest.approx(1.0) and scores[2] == pytest.approx(0.0)
    assert scores[3] > scores[0] > scores[1] > scores[2]
    assert scores[0] == pytest.approx(1 - 60 / 180) and scores[1] == pytest.approx(1 - 100 / 180)
    # coldStart: neutral keeps the old behaviour; one measured pod is not enough to rank
    assert list(PredictedLatencyScorer("pl2", svc, cold_start="neutral").score(CycleState(), make_request(), [fast, slow])) == [0.0, 0.0]
    assert list(scorer.score(CycleState(), make_request(), [fast, new])) == [0.0, 0.0]
    with pytest.raises(ValueError, match="coldStart"):
        PredictedLatencyScorer("pl3", svc, cold_start="fastest")
