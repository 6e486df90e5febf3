"""llm-d's own EndpointPickerConfig samples (copied from llm-d/llm-d-router into tests/fixtures/llmd-configs) load
unchanged; `extproc config check` reports them; the translation keeps reference semantics and fails loudly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.datalayer.endpoint import EndpointPool
from extproc.scheduling.config import ConfigError, build_config, load_config

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "llmd-configs").glob("*/*.yaml"))


def _pool() -> EndpointPool:
    return EndpointPool(default_models=frozenset({"m"}))


def test_samples_are_all_there() -> None:
    assert len(SAMPLES) == 26, [p.name for p in SAMPLES]
    for p in SAMPLES:
        head = p.read_text().splitlines()[0]
        assert "llm-d/llm-d-router (Apache-2.0)" in head, p


@pytest.mark.parametrize("path", SAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in SAMPLES])
def test_sample_loads(path: Path) -> None:
    from extproc.scheduling import registry

    registry.load_builtin_plugins()
    cfg = load_config(str(path), _pool(), {})
    assert cfg.scheduler.profiles
    for name, origin in cfg.origins.items():
        assert origin.reference_type or origin.note == "added implicitly", name


def test_config_check_cli_reports_and_fails() -> None:
    path = SAMPLES[0].parent / "epp-precise-prefix-cache-config.yaml"
    path = Path(str(path).replace("/perf/", "/deploy/")) if not path.exists() else path
    p = subprocess.run([sys.executable, "-m", "extproc", "config", "check", "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    by = {e["name"]: e for e in r["plugins"]}
    assert by["prefix-cache-scorer"]["runs_as"] == "precise-prefix-cache"
    assert by["prefix-cache-scorer"]["effective_parameters"]["block_size"] == 64  # tokenProcessorConfig.blockSize
    assert by["metrics-data-source"]["runs_as"].startswith("(accepted")
    assert "scraper" in by["metrics-data-source"]["maps_to"]
    assert by["precise-prefix-cache-producer"]["maps_to"]
    assert [p["name"] for p in r["profiles"]] == ["default"]
    assert r["profiles"][0]["filters"][-1] == "decode-filter"
    text = subprocess.run([sys.executable, "-m", "extproc", "config", "check", str(path)], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "profile 'default'" in text.stdout and "token-producer" in text.stdout


def test_config_check_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: no-such-scorer\nschedulingProfiles:\n- name: d\n  plugins: [{pluginRef: no-such-scorer}]\n")
    p = subprocess.run([sys.executable, "-m", "extproc", "config", "check", str(bad)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert str(bad) in p.stderr and "no-such-scorer" in p.stderr and "unknown plugin type" in p.stderr


# ------------------------------------------------------------------ translation rules
def _ref(plugins: list, profiles: list | None = None, **extra: object) -> dict:
    raw = {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig", "plugins": plugins,
           "schedulingProfiles": profiles or [{"name": "default", "plugins": [{"pluginRef": p.get("name", p["type"])} for p in plugins if "scorer" in p["type"]]}]}
    raw.update(extra)
    return raw


def test_approx_producer_parameters_in_our_units() -> None:
    cfg = build_config(_ref([{"type": "approx-prefix-cache-producer", "parameters": {"maxPrefixTokensToMatch": 16384, "lruCapacityPerServer": 1000, "blockSizeTokens": 16, "autoTune": False}},
                             {"type": "prefix-cache-scorer"}]), _pool())
    s = cfg.plugins["prefix-cache-scorer"]
    assert (s.block_size, s.max_blocks, s.auto_tune) == (256, 256, False)  # 16 tokens → clamped to 64 tokens = 256 B
    assert s.index.default_capacity == 1000
    assert cfg.origins["approx-prefix-cache-producer"].extproc_type == ""


def test_reference_default_prefix_scorer_and_gie_shape_keeps_ours() -> None:
    ref = build_config(_ref([{"type": "prefix-cache-scorer"}]), _pool()).plugins["prefix-cache-scorer"]
    assert (ref.block_size, ref.max_blocks) == (256, 2048)
    gie = {"apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig", "plugins": [{"type": "prefix-cache-scorer"}],
           "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "prefix-cache-scorer"}]}]}
    ours = build_config(gie, _pool()).plugins["prefix-cache-scorer"]
    assert (ours.block_size, ours.max_blocks) == (64, 256)


def test_match_length_weight() -> None:
    from extproc.datalayer.endpoint import Endpoint
    from extproc.plugin import CycleState
    from plugin_testlib import make_request, result_for

    cfg = build_config(_ref([{"type": "prefix-cache-scorer", "parameters": {"matchLengthWeight": 0.5, "matchLengthScaleTokens": 64}}]), _pool())
    s = cfg.plugins["prefix-cache-scorer"]
    pods = [Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000")]
    req = make_request("y" * 1024)  # 4 blocks of 256 B
    c = CycleState()
    s.score(c, req, pods)
    s.pre_request(c, req, result_for(pods[0]))
    scores = s.score(CycleState(), make_request("y" * 1024), pods)
    assert scores == [1.0, 0.0]  # full ratio and 256 tokens ≥ 64-token scale
    half = s.score(CycleState(), make_request("y" * 512 + "z" * 512), pods)
    assert half[0] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)  # 2 of 4 blocks; 128 tokens ≥ scale → length term 1


@pytest.mark.parametrize(
    "raw,plugin,reason",
    [
        ({"apiVersion": "v9", "plugins": []}, None, "apiVersion"),
        ({"kind": "Pod", "plugins": []}, None, "kind"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [], "schedulingProfiles": [], "bogus": 1}, None, "unknown top-level"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "featureGates": ["noSuchGate"], "plugins": []}, None, "feature gate"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [{"type": "prefix-cache-scorer", "parameters": {"prefixMatchInfoProducerName": "nope"}}]}, "prefix-cache-scorer", "names no"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [{"type": "openai-parser"}], "requestHandler": {"parsers": [{"pluginRef": "x"}]}}, "x", "undefined"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [{"type": "queue-scorer"}], "requestHandler": {"parsers": [{"pluginRef": "queue-scorer"}]}}, "queue-scorer", "not a parser"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [], "dataLayer": {"sources": [{"pluginRef": "ghost"}]}}, "ghost", "undefined"),
        ({"apiVersion": "llm-d.ai/v1alpha1", "plugins": [{"type": "utilization-detector", "parameters": {"headroom": 0.2}}],
          "flowControl": {"saturationDetector": {"pluginRef": "utilization-detector"}}}, "utilization-detector", "headroom"),
    ],
)
def test_translation_errors_name_file_plugin_reason(raw: dict, plugin: str | None, reason: str) -> None:
    raw.setdefault("schedulingProfiles", [{"name": "d", "plugins": []}])
    with pytest.raises(ConfigError) as ei:
        build_config(raw, _pool(), path="f.yaml")
    assert ei.value.path == "f.yaml" and ei.value.plugin == plugin and reason in ei.value.reason, str(ei.value)


def test_flow_control_section_and_detector() -> None:
    raw = _ref([{"type": "utilization-detector", "parameters": {"queueDepthThreshold": 7, "kvCacheUtilThreshold": 0.9, "metricsStalenessThreshold": "150ms"}},
                {"type": "queue-scorer"}],
               featureGates=["flowControl"], flowControl={"saturationDetector": {"pluginRef": "utilization-detector"}, "defaultRequestTTL": "10s", "maxRequests": 64})
    cfg = build_config(raw, _pool())
    assert cfg.feature_gates == {"flowControl": True}
    assert cfg.flow_control["enabled"] is True and cfg.flow_control["queueTtlSeconds"] == 10.0 and cfg.flow_control["maxQueueLength"] == 64
    assert cfg.saturation == {"queueDepthThreshold": 7, "kvCacheUtilThreshold": 0.9, "metricsStalenessThresholdSeconds": 0.15}
    from extproc.admission.flow_control import FlowControlConfig
    from extproc.admission.saturation import SaturationDetector

    fc = FlowControlConfig.from_config(cfg.flow_control)
    assert fc.enabled and fc.queue_ttl_s == 10.0
    det = SaturationDetector.from_config(cfg.saturation)
    assert det.queue_depth_threshold == 7 and det.metrics_staleness_s == 0.15


def test_absorbed_plugins_in_profiles_are_dropped_with_a_record() -> None:
    raw = _ref([{"type": "openai-parser"}, {"type": "queue-scorer"}],
               [{"name": "default", "plugins": [{"pluginRef": "openai-parser"}, {"pluginRef": "queue-scorer"}]}],
               requestHandler={"parsers": [{"pluginRef": "openai-parser"}]})
    cfg = build_config(raw, _pool())
    assert [ws.scorer.name for ws in cfg.scheduler.profiles["default"].scorers] == ["queue-scorer"]
    assert "openai-parser" not in cfg.plugins and "OpenAI" in cfg.origins["openai-parser"].note


def test_endpoints_file_with_labels(tmp_path: Path) -> None:
    import argparse

    from extproc.server.cli import add_arguments, options_from_args

    f = tmp_path / "eps.json"
    f.write_text(json.dumps([{"address": "10.0.0.1:8000", "labels": {"llm-d.ai/role": "prefill"}}, "10.0.0.2:8000"]))
    p = argparse.ArgumentParser()
    add_arguments(p)
    o = options_from_args(p.parse_args(["--endpoints-file", str(f)]))
    assert o.endpoints == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert o.labels == {"10.0.0.1:8000": {"llm-d.ai/role": "prefill"}}


def test_precise_producer_event_sources() -> None:
    kv = SAMPLES[0].parent.parent / "deploy" / "sim-epp-kvcache-config.yaml"
    cfg = load_config(str(kv), _pool(), {})
    o = cfg.origins["prefix-cache-scorer"]
    assert o.extproc_type == "precise-prefix-cache"
    # the shared endpoint every pod publishes to is bound (tests/unit/kv/test_kv_shared_endpoint.py)
    assert cfg.plugins["prefix-cache-scorer"].events.shared_endpoint == "tcp://0.0.0.0:5557"
    assert cfg.plugins["prefix-cache-scorer"].block_size == 16
    perf = SAMPLES[0].parent.parent / "perf" / "precise-prefix.yaml"
    services: dict = {}
    cfg = load_config(str(perf), _pool(), services)
    tmpl = services["kv_events"].template
    assert tmpl is not None and tmpl.endpoint == "tcp://{host}:5557" and tmpl.topic == "kv@" and tmpl.bind is False


@pytest.mark.parametrize("path", SAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in SAMPLES])
async def test_sample_server_becomes_ready(path: Path) -> None:
    """The scheduler server starts on every loadable sample and reports SERVING on gRPC health."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from extproc.scheduling import registry
    from extproc.server.app import SchedulerServer, ServeOptions

    registry.load_builtin_plugins()
    mode = "streamed" if "reporter" in path.name else "observability"
    s = SchedulerServer(ServeOptions(endpoints=["127.0.0.1:9"], models=["m"], host="127.0.0.1", grpc_port=0, health_port=0,
                                     metrics_port=0, scrape_interval_s=3600, config=str(path), response_observe=mode,
                                     kv_events_bind="tcp://127.0.0.1:*"))  # a sample's zmqEndpoint binds a free port here
    try:
        await s.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.health_port}") as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await s.stop()
