"""Plugins added for llm-d drop-in: each decision asserted on fixed pod states (one test group per plugin)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics
from extproc.plugin import PEER_ENDPOINT, PREFIX_MATCHED_BLOCKS, PREFIX_SCORES, CycleState, PluginContext, SchedulingError
from extproc.scheduling import registry

from plugin_testlib import make_endpoint, make_request, result_for


def build(t: str, ctx: PluginContext, **params: Any) -> Any:
    registry.load_builtin_plugins()
    return registry.PLUGIN_TYPES[t](t, dict(params), ctx)


# ------------------------------------------------------------------ no-hit-lru-scorer
def test_no_hit_lru_cold_ranks_never_used_then_lru(ctx: PluginContext) -> None:
    s = build("no-hit-lru-scorer", ctx, lruSize=8)
    pods = [make_endpoint(i) for i in range(3)]
    # cold request, nobody used yet: rank by candidate order 1, 0.5, 0
    c = CycleState()
    assert s.score(c, make_request(), pods) == [1.0, 0.5, 0.0]
    s.pre_request(c, make_request(), result_for(pods[0]))  # pod 0 served a cold request
    c = CycleState()
    assert s.score(c, make_request(), pods) == [0.0, 1.0, 0.5]  # never-used 1, 2 first, then pod 0
    s.pre_request(c, make_request(), result_for(pods[1]))
    c = CycleState()
    # never used: pod 2 (1.0); then LRU order oldest first: pod 0 (0.5), pod 1 (0.0)
    assert s.score(c, make_request(), pods) == [0.5, 0.0, 1.0]


def test_no_hit_lru_warm_is_neutral_and_not_recorded(ctx: PluginContext) -> None:
    s = build("no-hit-lru-scorer", ctx)
    pods = [make_endpoint(i) for i in range(3)]
    c = CycleState()
    c.set(PREFIX_MATCHED_BLOCKS, {pods[2].address: 3})
    assert s.score(c, make_request(), pods) == [0.5, 0.5, 0.5]
    s.pre_request(c, make_request(), result_for(pods[2]))
    assert list(s._lru) == []
    assert s.score(CycleState(), make_request(), pods[:1]) == [1.0]


def test_no_hit_lru_lru_size_bounds(ctx: PluginContext) -> None:
    s = build("no-hit-lru-scorer", ctx, lruSize=1)
    pods = [make_endpoint(i) for i in range(3)]
    for p in pods[:2]:
        c = CycleState()
        s.score(c, make_request(), pods)
        s.pre_request(c, make_request(), result_for(p))
    assert list(s._lru) == [pods[1].address]
    with pytest.raises(ValueError):
        build("no-hit-lru-scorer", ctx, lruSize=0)


# ------------------------------------------------------------------ utilization-filter
def test_utilization_filter_caps(ctx: PluginContext) -> None:
    f = build("utilization-filter", ctx, conditions=[{"metric": "running-requests", "maxValue": 40}, {"metric": "waiting-queue", "maxValue": 0}])
    pods = [make_endpoint(0, running=10), make_endpoint(1, running=41), make_endpoint(2, running=5, waiting=1)]
    assert [e.address for e in f.filter(CycleState(), make_request(), pods)] == [pods[0].address]
    f = build("utilization-filter", ctx, conditions=[{"metric": "kv-cache-utilization", "maxValue": 0.5}], fallbackOnEmpty=True)
    full = [make_endpoint(0, kv_usage=0.9), make_endpoint(1, kv_usage=0.8)]
    assert f.filter(CycleState(), make_request(), full) == full
    f = build("utilization-filter", ctx, conditions=[{"metric": "active-requests", "maxValue": 1}])
    pods[0].inflight = 2
    assert [e.address for e in f.filter(CycleState(), make_request(), pods)] == [pods[1].address, pods[2].address]
    with pytest.raises(ValueError):
        build("utilization-filter", ctx, conditions=[{"metric": "kv-cache-utilization", "maxValue": 2}])
    with pytest.raises(ValueError):
        build("utilization-filter", ctx, conditions=[])


# ------------------------------------------------------------------ prefix-cache-affinity-filter
def test_prefix_affinity_keeps_sticky_pods(ctx: PluginContext) -> None:
    f = build("prefix-cache-affinity-filter", ctx)
    pods = [make_endpoint(i) for i in range(3)]
    c = CycleState()
    c.set(PREFIX_SCORES, {pods[0].address: 0.9, pods[1].address: 0.5, pods[2].address: 0.85})
    assert [e.address for e in f.filter(c, make_request(), pods)] == [pods[0].address, pods[2].address]
    c = CycleState()
    c.set(PREFIX_SCORES, {pods[0].address: 0.2})
    assert f.filter(c, make_request(), pods) == pods  # nobody sticky → no-op
    assert f.filter(CycleState(), make_request(), pods) == pods  # no prefix scorer in the config → no-op


def test_prefix_affinity_ttft_gate_breaks_stickiness(ctx: PluginContext) -> None:
    f = build("prefix-cache-affinity-filter", ctx, maxTTFTPenaltyMs=1000, peakPrefillThroughput=1000)
    pods = [make_endpoint(i) for i in range(2)]
    pods[0].inflight_prefill_tokens = 5000  # 5000 ms estimated TTFT vs 0 ms on pod 1
    c = CycleState()
    c.set(PREFIX_SCORES, {pods[0].address: 1.0, pods[1].address: 0.0})
    assert f.filter(c, make_request(), pods) == pods
    pods[0].inflight_prefill_tokens = 500  # within the penalty: stay sticky
    assert f.filter(c, make_request(), pods) == [pods[0]]


def test_prefix_affinity_reads_config_prefix_scorer(ctx: PluginContext) -> None:
    scorer = build("prefix-cache-scorer", ctx)
    f = build("prefix-cache-affinity-filter", ctx)
    pods = [make_endpoint(i) for i in range(2)]
    req = make_request("x" * 640)
    c = CycleState()
    scorer.score(c, req, pods)
    scorer.pre_request(c, req, result_for(pods[1]))
    assert f.filter(CycleState(), make_request("x" * 640), pods) == [pods[1]]


def test_prefix_affinity_exploration(ctx: PluginContext) -> None:
    f = build("prefix-cache-affinity-filter", ctx, explorationProbability=1.0)
    pods = [make_endpoint(i) for i in range(2)]
    c = CycleState()
    c.set(PREFIX_SCORES, {pods[0].address: 1.0})
    assert f.filter(c, make_request(), pods) == pods


# ------------------------------------------------------------------ probabilistic-admitter
def test_probabilistic_admitter_curve_and_priority(ctx: PluginContext) -> None:
    a = build("probabilistic-admitter", ctx, seed=1)
    idle = [make_endpoint(i, waiting=0, kv_usage=0.0, updated_at=1.0) for i in range(2)]
    busy = [make_endpoint(i, waiting=5, kv_usage=0.1, updated_at=1.0) for i in range(2)]  # saturation 1.0
    assert a.reject_probability(idle) == 0.0
    assert a.reject_probability(busy) == 1.0
    half = [make_endpoint(0, waiting=1, updated_at=1.0)]  # saturation 0.2 → 0.2^5 × 300 = 0.096
    assert a.reject_probability(half) == pytest.approx(0.096)
    assert a.reject_probability([make_endpoint(0)]) == 1.0  # never scraped counts as saturated
    sheddable = make_request(headers={"x-gateway-inference-priority": "-1"})
    with pytest.raises(SchedulingError) as ei:
        a.admit(CycleState(), sheddable, busy)
    assert ei.value.status == 429 and ei.value.code == "shed_probabilistic"
    a.admit(CycleState(), make_request(), busy)  # priority 0: always admitted
    a.admit(CycleState(), sheddable, idle)
    a.admit(CycleState(), sheddable, [])


def test_probabilistic_admitter_runs_before_profiles() -> None:
    from extproc.scheduling.config import build_config

    pool = EndpointPool(default_models=frozenset({"base-model"}))
    pool.set_endpoints(["10.0.0.1:8000"])
    for e in pool.snapshot():
        e.metrics = PodMetrics(waiting=50, updated_at=1.0)
    cfg = build_config({"plugins": [{"type": "probabilistic-admitter"}, {"type": "random-picker"}],
                        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "random-picker"}]}]}, pool)
    with pytest.raises(SchedulingError):
        cfg.scheduler.schedule(make_request(headers={"x-gateway-inference-priority": "-2"}))
    assert cfg.scheduler.schedule(make_request())[0].primary.address == "10.0.0.1:8000"


# ------------------------------------------------------------------ topology
def _topo(i: int, host: str | None, rack: str | None, zone: str | None) -> Endpoint:
    labels = {}
    if host:
        labels["kubernetes.io/hostname"] = host
    if rack:
        labels["topology.kubernetes.io/rack"] = rack
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return Endpoint(f"10.0.2.{i}:8000", labels=labels)


def test_topology_scorer_and_filter(ctx: PluginContext) -> None:
    build("topology-extractor", ctx)
    s = build("topology-affinity-scorer", ctx)
    f = build("topology-affinity-filter", ctx, minAffinity="rack")
    peer = _topo(9, "h1", "r1", "z1")
    pods = [_topo(0, "h1", "r1", "z1"), _topo(1, "h2", "r1", "z1"), _topo(2, "h3", "r2", "z1"), _topo(3, None, None, None)]
    c = CycleState()
    assert s.score(c, make_request(), pods) == [0.0] * 4  # no peer yet
    assert f.filter(c, make_request(), pods) == pods
    c.set(PEER_ENDPOINT, peer)
    assert s.score(c, make_request(), pods) == [1.0, 0.2, 0.05, 0.0]
    assert f.filter(c, make_request(), pods) == pods[:2]
    far = build("topology-affinity-filter", ctx, minAffinity="host")
    assert far.filter(c, make_request(), pods[1:]) == pods[1:]  # nobody on the host: fail open


# ------------------------------------------------------------------ dcgm + endpoint attributes
def test_dcgm_is_inactive_and_attribute_plugins_see_nothing(ctx: PluginContext) -> None:
    src = build("dcgm-data-source", ctx, port=9400, interval="1s")
    assert src.active is False and "no DCGM" in src.inactive_reason
    assert build("dcgm-extractor", ctx).active is False
    f = build("endpoint-attribute-filter", ctx, attribute="GPUUtilization", producer="dcgm-extractor", onMissing="Pass",
              algorithm={"type": "threshold", "threshold": {"operator": "LessThanOrEqual", "value": 0.9}})
    pods = [make_endpoint(i, updated_at=1.0) for i in range(2)]
    assert f.filter(CycleState(), make_request(), pods) == pods
    f = build("endpoint-attribute-filter", ctx, attribute="GPUUtilization", producer="dcgm-extractor", onMissing="Fail",
              algorithm={"type": "threshold", "threshold": {"operator": "LessThanOrEqual", "value": 0.9}})
    assert f.filter(CycleState(), make_request(), pods) == []
    s = build("endpoint-attribute-scorer", ctx, attributeKey="GPUUtilization", producer="dcgm-extractor",
              algorithm={"type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 0.0, "max": 1.0}}})
    assert s.score(CycleState(), make_request(), pods) == [0.0, 0.0]


def test_endpoint_attributes_from_scraped_metrics(ctx: PluginContext) -> None:
    pods = [make_endpoint(0, waiting=2, updated_at=1.0), make_endpoint(1, waiting=8, updated_at=1.0), make_endpoint(2, waiting=5, updated_at=1.0)]
    f = build("endpoint-attribute-filter", ctx, attribute="num_requests_waiting",
              algorithm={"type": "threshold", "threshold": {"operator": "LessThan", "value": 6}})
    assert f.filter(CycleState(), make_request(), pods) == [pods[0], pods[2]]
    s = build("endpoint-attribute-scorer", ctx, attributeKey="num_requests_waiting", algorithm={"type": "linear_lower_is_better"})
    assert s.score(CycleState(), make_request(), pods) == [1.0, 0.0, 0.5]
    s = build("endpoint-attribute-scorer", ctx, attributeKey="kv_cache_usage_perc",
              algorithm={"type": "linear_higher_is_better", "normalization": {"fixedRange": {"min": 0, "max": 1}}})
    assert s.score(CycleState(), make_request(), [make_endpoint(0, kv_usage=0.25, updated_at=1.0)]) == [0.25]
    with pytest.raises(ValueError, match="not extracted"):
        build("endpoint-attribute-scorer", ctx, attributeKey="custom.thing", algorithm={"type": "linear_lower_is_better"})


# ------------------------------------------------------------------ data-parallel-profile-handler
def test_data_parallel_handler_is_single_profile(ctx: PluginContext) -> None:
    from extproc.scheduling.config import ConfigError, build_config

    pool = EndpointPool(default_models=frozenset({"base-model"}))
    pool.set_endpoints(["10.0.0.1:8000", "10.0.0.1:8001"])
    raw = {"plugins": [{"type": "data-parallel-profile-handler", "parameters": {"primaryPort": 8000}}, {"type": "queue-scorer"}],
           "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}]}
    r, _ = build_config(raw, pool).scheduler.schedule(make_request())
    assert r.primary.address in ("10.0.0.1:8000", "10.0.0.1:8001") and r.headers == {}
    raw["plugins"][0]["parameters"]["primaryPort"] = 70000
    with pytest.raises(ConfigError, match="primaryPort"):
        build_config(raw, pool)


# ------------------------------------------------------------------ reference parameter names on existing scorers
def test_active_request_reference_formula(ctx: PluginContext) -> None:
    pods = [make_endpoint(i) for i in range(3)]
    for e, n in zip(pods, (0, 2, 4)):
        e.inflight = n
    ours = build("active-request-scorer", ctx)
    assert ours.score(CycleState(), make_request(), pods) == [1.0, 0.5, 0.0]
    ref = build("active-request-scorer", ctx, idleThreshold=2, maxBusyScore=0.5)
    assert ref.score(CycleState(), make_request(), pods) == [1.0, 1.0, 0.0]
    ref0 = build("active-request-scorer", ctx, idleThreshold=0, requestTimeout="2m")
    assert ref0.score(CycleState(), make_request(), pods) == [1.0, 0.5, 0.0]
    pods[0].inflight = 1
    assert ref0.score(CycleState(), make_request(), pods) == [0.75, 0.5, 0.0]  # (4-1)/4, not min–max


def test_token_load_and_running_reference_names(ctx: PluginContext) -> None:
    t = build("token-load-scorer", ctx, queueThresholdTokens=100)
    e = make_endpoint(0)
    e.inflight_prefill_tokens = 25
    assert t.score(CycleState(), make_request(), [e]) == [0.75]
    with pytest.raises(ValueError, match="not both"):
        build("token-load-scorer", ctx, queueThresholdTokens=1, maxTokens=1)
    r = build("running-requests-size-scorer", ctx)
    assert r.score(CycleState(), make_request(), [make_endpoint(0, running=1), make_endpoint(1, running=3)]) == [1.0, 0.0]


def test_llmd_files_get_reference_defaults() -> None:
    from extproc.scheduling.config import build_config

    pool = EndpointPool(default_models=frozenset({"base-model"}))
    raw = {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
           "plugins": [{"type": "active-request-scorer"}, {"type": "token-load-scorer"}],
           "schedulingProfiles": [{"name": "d", "plugins": [{"pluginRef": "active-request-scorer"}, {"pluginRef": "token-load-scorer"}]}]}
    cfg = build_config(raw, pool)
    assert cfg.plugins["active-request-scorer"].idle_threshold == 0
    assert cfg.plugins["token-load-scorer"].max_tokens == 4194304
    raw.pop("apiVersion")
    raw.pop("kind")
    cfg = build_config(raw, pool)
    assert cfg.plugins["active-request-scorer"].idle_threshold is None
    assert cfg.plugins["token-load-scorer"].max_tokens == 65536


# ------------------------------------------------------------------ always-disagg-multimodal-decider
def test_multimodal_decider(ctx: PluginContext) -> None:
    import json as _json

    from extproc.api import parse_request
    from extproc.plugin import Decider

    d = build("always-disagg-multimodal-decider", ctx)
    assert isinstance(d, Decider)

    def chat(content: object) -> Any:
        body = {"model": "base-model", "messages": [{"role": "user", "content": content}]}
        return parse_request("/v1/chat/completions", _json.dumps(body).encode(), {})

    assert d.disaggregate(CycleState(), chat("just text"), None) is False
    assert d.disaggregate(CycleState(), chat([{"type": "text", "text": "hi"}]), None) is False
    for t in ("image_url", "video_url", "input_audio"):
        assert d.disaggregate(CycleState(), chat([{"type": "text", "text": "look"}, {"type": t, t: {"url": "x"}}]), None) is True
    assert d.disaggregate(CycleState(), make_request(), None) is False  # completions: no messages


# ------------------------------------------------------------------ program-aware-fairness
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _obs(prompt: int, output: int) -> Any:
    from extproc.plugin import Observation

    return Observation("r", "10.0.0.1:8000", "base-model", prompt, 0.0, output_tokens=output)


def test_program_aware_least_attained_service(ctx: PluginContext) -> None:
    from extproc.scheduling.plugins.program_aware import ProgramAwareFairness

    clock = _Clock()
    p = ProgramAwareFairness(clock=clock, half_life_s=60.0)
    heavy = make_request(headers={"x-gateway-inference-fairness-id": "heavy"})
    light = make_request(headers={"x-llm-d-inference-fairness-id": "light"})  # llm-d's header name works too
    p.on_complete(heavy, _obs(1000, 500))  # 1000 + 2 × 500 = 2000
    p.on_complete(light, _obs(10, 5))  # 20
    assert p.service("heavy") == 2000 and p.service("light") == 20
    now = clock.t
    # equal head waits: the least served program goes first
    assert p.pick_tenant({"heavy": (3, now - 1), "light": (1, now - 1)}, now) == "light"
    # head wait breaks ties between equally served programs (both unknown → service 0)
    assert p.pick_tenant({"a": (1, now - 5), "b": (1, now - 1)}, now) == "a"
    clock.t += 60.0
    assert p.service("heavy") == pytest.approx(1000.0)  # one half-life later
    for _ in range(3):
        p.on_complete(light, _obs(0, 0))
    p2 = build("program-aware-fairness", ctx, lasHalfLifeSeconds=0, evictionTtlSeconds=10, evictionSweepSeconds=1)
    p2.on_complete(heavy, _obs(1, 0))
    with pytest.raises(ValueError):
        build("program-aware-fairness", ctx, strategy="drr")


async def test_program_aware_orders_flow_control_releases() -> None:
    import asyncio

    from extproc.admission.flow_control import FlowControlConfig, FlowController
    from extproc.admission.saturation import SaturationDetector
    from extproc.scheduling.plugins.program_aware import ProgramAwareFairness

    pod = make_endpoint(0, waiting=100, updated_at=1e12)  # saturated
    policy = ProgramAwareFairness()
    policy.on_complete(make_request(headers={"x-gateway-inference-fairness-id": "heavy"}), _obs(5000, 1000))
    fc = FlowController(FlowControlConfig(enabled=True, tick_s=3600), SaturationDetector(), lambda m: [pod], {"default": policy})
    order: list[str] = []

    async def wait(tenant: str) -> None:
        await fc.wait(make_request(headers={"x-gateway-inference-fairness-id": tenant}))
        order.append(tenant)

    tasks = [asyncio.create_task(wait(t)) for t in ("heavy", "heavy", "light")]
    await asyncio.sleep(0.01)
    assert fc.queued() == 3 and order == []
    pod.metrics = PodMetrics(waiting=0, updated_at=1e12)
    for _ in range(3):
        fc.notify()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    await fc.stop()
    assert order[0] == "light"  # round robin would have served the first 'heavy' first


def test_sample_program_aware_wires_fairness() -> None:
    from pathlib import Path

    from extproc.scheduling.config import load_config

    path = Path(__file__).resolve().parents[2] / "fixtures" / "llmd-configs" / "deploy" / "sim-program-aware-config.yaml"
    cfg = load_config(str(path), EndpointPool(), {})
    assert cfg.flow_control["enabled"] is True
    assert cfg.fairness["default"] is cfg.plugins["program-aware-fairness"]
    assert cfg.plugins["program-aware-fairness"] in cfg.scheduler.observers


# ------------------------------------------------------------------ soft-reflective-ceiling-policy
def test_soft_reflective_ceilings(ctx: PluginContext) -> None:
    p = build("soft-reflective-ceiling-policy", ctx)
    assert p.compute_limits(0.9, 1) == [1.0]
    assert p.compute_limits(0.2, 3) == [1.0, 1.0, 1.0]  # below every reflective ceiling (0.9, 0.8)
    assert p.compute_limits(1.2, 3) == [1.0, 0.0, 0.0]
    # s = 0.75 with 3 bands: band 1 reflective 0.625 and band 2 0.25 are both reached → alternate, period 3
    seen = [p.compute_limits(0.75, 3) for _ in range(6)]
    assert all(c[0] == 1.0 for c in seen)
    assert [c[1] for c in seen].count(1.0) == 2 and all(c[1] == c[2] for c in seen)
    with pytest.raises(ValueError):
        build("soft-reflective-ceiling-policy", ctx, anything=1)


def test_saturation_level() -> None:
    from extproc.admission.saturation import SaturationDetector

    det = SaturationDetector(queue_depth_threshold=10, kv_cache_util_threshold=0.8, metrics_staleness_s=1e18)
    pods = [make_endpoint(0, waiting=5, kv_usage=0.2, updated_at=1.0), make_endpoint(1, waiting=0, kv_usage=0.8, updated_at=1.0), make_endpoint(2)]
    assert det.level(pods, now=2.0) == pytest.approx((0.5 + 1.0) / 2)  # the never-scraped pod is unknown, left out


async def test_soft_reflective_holds_low_band_while_high_passes() -> None:
    import asyncio

    from extproc.admission.flow_control import FlowControlConfig, FlowController
    from extproc.admission.saturation import SaturationDetector
    from extproc.scheduling.plugins.soft_reflective_ceiling import SoftReflectiveCeilingPolicy

    pod = make_endpoint(0, waiting=9, updated_at=1e12)  # level 9/10 = 0.9: not saturated (below QD 10)
    det = SaturationDetector(queue_depth_threshold=10, kv_cache_util_threshold=0.8, metrics_staleness_s=1e18)
    fc = FlowController(FlowControlConfig(enabled=True, tick_s=3600), det, lambda m: [pod], usage_limit=SoftReflectiveCeilingPolicy(), known_priorities=[10, 0])
    high = make_request(headers={"x-gateway-inference-priority": "10"})
    low = make_request()
    assert fc.must_wait(high) is False  # band 0: open below saturation 1
    # band 1 of 2: reflective ceiling 1 − 0.9 = 0.1 reached → alternating with period 9: held on most calls
    held = sum(fc.must_wait(low) for _ in range(9))
    assert held == 8
    pod.metrics = PodMetrics(waiting=0, updated_at=1e12)
    assert fc.must_wait(low) is False
    await fc.stop()


def test_sample_soft_reflective_wires_policy() -> None:
    from pathlib import Path

    from extproc.scheduling.config import load_config

    path = Path(__file__).resolve().parents[2] / "fixtures" / "llmd-configs" / "deploy" / "soft-reflective-ceiling-epp-config.yaml"
    cfg = load_config(str(path), EndpointPool(), {})
    assert cfg.flow_control["enabled"] is True
    assert cfg.usage_limit is cfg.plugins["soft-reflective-ceiling-policy"]


# ------------------------------------------------------------------ mm-embeddings-cache producer + scorer
def test_mm_embeddings_cache_affinity(ctx: PluginContext) -> None:
    import json as _json

    from extproc.api import parse_request

    prod = build("mm-embeddings-cache-producer", ctx, cacheSizeInMBPerServer=4)  # 2 entries per pod
    scorer = build("mm-embeddings-cache-scorer", ctx)

    def chat(*urls: str) -> Any:
        content = [{"type": "text", "text": "describe"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        body = {"model": "base-model", "messages": [{"role": "user", "content": content}]}
        return parse_request("/v1/chat/completions", _json.dumps(body).encode(), {})

    pods = [make_endpoint(i) for i in range(2)]
    assert scorer.score(CycleState(), chat("a", "b"), pods) == [0.0, 0.0]
    c = CycleState()
    req = chat("a", "b", "a")  # the repeated item counts once
    scorer.score(c, req, pods)
    prod.pre_request(c, req, result_for(pods[1]))
    assert scorer.score(CycleState(), chat("a", "b"), pods) == [0.0, 1.0]
    assert scorer.score(CycleState(), chat("a", "z"), pods) == [0.0, 0.5]
    assert scorer.score(CycleState(), make_request(), pods) == [0.0, 0.0]  # no items
    c = CycleState()
    req = chat("c", "d")
    scorer.score(c, req, pods)
    prod.pre_request(c, req, result_for(pods[1]))  # LRU of 2 entries: a and b evicted
    assert scorer.score(CycleState(), chat("a", "b"), pods) == [0.0, 0.0]
    assert build("mm-embeddings-cache-producer", ctx, cacheSizeInMB=2048).entries_per_pod == 1024


# ------------------------------------------------------------------ burst-prefix-cache (burst-prefix-cache-producer)
def test_burst_prefix_groups_fill_then_spill(ctx: PluginContext) -> None:
    from extproc.scheduling.plugins.burst_prefix import BurstPrefixCacheScorer

    clock = _Clock()
    s = BurstPrefixCacheScorer(window_ms=100, max_per_replica=2, block_tokens=16, clock=clock)
    pods = [make_endpoint(i) for i in range(3)]
    prompt = "the same rollout prompt " * 20

    def route(p: str, pick: int | None = None) -> list[float]:
        c = CycleState()
        req = make_request(p)
        scores = s.score(c, req, pods)
        chosen = pods[pick] if pick is not None else pods[max(range(3), key=lambda i: scores[i])]
        s.pre_request(c, req, result_for(chosen))
        return scores

    assert route(prompt, pick=1) == [0.0, 0.0, 0.0]  # first of the group: no affinity, placed by other scorers
    assert route(prompt) == [0.0, 1.0, 0.0]  # joins pod 1 (now 2 of the group there = maxPerReplica)
    spill = route(prompt)
    assert spill[1] == 0.0 and sum(spill) == 1.0  # pod 1 full: spill to a least-loaded unused pod
    assert route("a different prompt entirely " * 20) == [0.0, 0.0, 0.0]
    clock.t += 0.2  # window over: the group is forgotten
    assert route(prompt, pick=2) == [0.0, 0.0, 0.0]
    assert route("tiny") == [0.0, 0.0, 0.0]  # shorter than a block: no prefix, no affinity


def test_burst_prefix_min_colocate_and_params(ctx: PluginContext) -> None:
    from extproc.scheduling.plugins.burst_prefix import BurstPrefixCacheScorer

    s = BurstPrefixCacheScorer(block_tokens=16, min_colocate_blocks=2, clock=_Clock())
    pods = [make_endpoint(i) for i in range(2)]
    shared = "x" * 200
    for text, pod in ((shared + "first suffix" * 10, 0), ("unrelated " * 30, 1), ("unrelated too " * 30, 1)):
        c = CycleState()
        req = make_request(text)
        s.score(c, req, pods)
        s.pre_request(c, req, result_for(pods[pod]))
    # shares 3 leading blocks (≥ 2) with the group on pod 0, which holds 1 of 4 (< fair share 2): joins it
    assert s.score(CycleState(), make_request(shared + "other suffix" * 10), pods) == [1.0, 0.0]
    c = CycleState()
    req = make_request(shared + "third suffix" * 10)
    s.score(c, req, pods)
    s.pre_request(c, req, result_for(pods[0]))
    c = CycleState()
    req = make_request(shared + "fourth suffix" * 10)
    s.score(c, req, pods)
    s.pre_request(c, req, result_for(pods[0]))
    # pod 0 now holds 3 of 6 (fair share ceil(6/2) = 3): no longer joined, balance wins
    assert s.score(CycleState(), make_request(shared + "fifth suffix" * 10), pods) == [0.0, 0.0]
    with pytest.raises(ValueError, match="windowDurationMs"):
        build("burst-prefix-cache", ctx, windowDurationMs=0)
    with pytest.raises(ValueError, match="maxPerReplica"):
        build("burst-prefix-cache", ctx, maxPerReplica=0)


# ------------------------------------------------------------------ request-attribute-reporter
def test_request_attribute_reporter(ctx: PluginContext) -> None:
    r = build("request-attribute-reporter", ctx, attributes=[
        {"key": {"name": "cost"}, "expression": "usage.completion_tokens", "condition": "has(usage.completion_tokens)"},
        {"key": {"namespace": "my.ns", "name": "total"}, "expression": "(has(usage.prompt_tokens) ? usage.prompt_tokens : 0) + 1"},
        {"key": {"name": "bad"}, "expression": "usage.prompt_tokens > 1"},  # boolean, not an integer: not reported
    ])  # fmt: skip
    assert r.report(make_request(), {"prompt_tokens": 4, "completion_tokens": 7}) == [("envoy.lb", "cost", 7), ("my.ns", "total", 5)]
    assert r.report(make_request(), {}) == [("my.ns", "total", 1)]
    with pytest.raises(ValueError, match="invalid CEL"):
        build("request-attribute-reporter", ctx, attributes=[{"key": {"name": "x"}, "expression": "usage."}])
    with pytest.raises(ValueError, match="non-empty"):
        build("request-attribute-reporter", ctx, attributes=[])


# ------------------------------------------------------------------ round-robin / global-strict fairness policies
def test_round_robin_and_global_strict_fairness(ctx: PluginContext) -> None:
    rr = build("round-robin-fairness-policy", ctx)
    q = {"a": (2, 5.0), "b": (1, 1.0), "c": (1, 3.0)}
    assert [rr.pick_tenant(q, 10.0) for _ in range(4)] == ["a", "b", "c", "a"]
    gs = build("global-strict-fairness-policy", ctx)
    assert gs.pick_tenant(q, 10.0) == "b"  # oldest head first, whoever sent it
    assert gs.pick_tenant({"a": (1, 5.0), "b": (0, 1.0)}, 10.0) == "a"


def test_unsupported_reference_types_name_the_reason() -> None:
    from extproc.scheduling.config import ConfigError, build_config

    raw = {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig", "plugins": [{"type": "anthropic-parser"}],
           "schedulingProfiles": [{"name": "d", "plugins": []}]}
    with pytest.raises(ConfigError) as ei:
        build_config(raw, EndpointPool(), path="f.yaml")
    assert ei.value.plugin == "anthropic-parser" and "OpenAI API only" in ei.value.reason


def test_deprecated_precise_prefix_cache_scorer_maps() -> None:
    from extproc.scheduling.config import build_config

    raw = {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
           "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": {"tokenProcessorConfig": {"blockSize": 32}}}, {"type": "fcfs-ordering-policy"}],
           "schedulingProfiles": [{"name": "d", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}],
           "flowControl": {"defaultPriorityBand": {"orderingPolicyRef": "fcfs-ordering-policy"}}}
    cfg = build_config(raw, EndpointPool())
    assert cfg.plugins["precise-prefix-cache-scorer"].type_name == "precise-prefix-cache"
    assert cfg.plugins["precise-prefix-cache-scorer"].block_size == 32


# ------------------------------------------------------------------ E/P/D: encode stage of disagg-profile-handler
def test_encode_stage_with_multimodal_decider() -> None:
    import json as _json

    from extproc.api import parse_request
    from extproc.scheduling.config import build_config

    pool = EndpointPool(default_models=frozenset({"base-model"}))
    roles = ["encode", "encode", "prefill", "decode"]
    addrs = [f"10.0.3.{i}:8000" for i in range(4)]
    pool.set_endpoints(addrs, {a: {"llm-d.ai/role": r} for a, r in zip(addrs, roles)})
    raw = {
        "apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "encode-filter"}, {"type": "prefill-filter"}, {"type": "decode-filter"},
                    {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 2}},
                    {"type": "disagg-profile-handler", "parameters": {"deciders": {"encode": "always-disagg-multimodal-decider", "prefill": "always-disagg-pd-decider"}}},
                    {"type": "always-disagg-multimodal-decider"}, {"type": "always-disagg-pd-decider"}],
        "schedulingProfiles": [{"name": "encode", "plugins": [{"pluginRef": "encode-filter"}, {"pluginRef": "max-score-picker"}]},
                               {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}]},
                               {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}]}],
    }  # fmt: skip
    cfg = build_config(raw, pool)
    body = {"model": "base-model", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}
    r, _ = cfg.scheduler.schedule(parse_request("/v1/chat/completions", _json.dumps(body).encode(), {}))
    assert r.primary_profile == "decode" and r.primary.address == "10.0.3.3:8000"
    assert sorted(r.headers["x-encoder-hosts-ports"].split(",")) == ["10.0.3.0:8000", "10.0.3.1:8000"]
    assert r.headers["x-prefiller-host-port"] == "10.0.3.2:8000"
    r, _ = cfg.scheduler.schedule(make_request())  # text only: no encode stage
    assert "x-encoder-hosts-ports" not in r.headers and r.headers["x-prefiller-host-port"] == "10.0.3.2:8000"
