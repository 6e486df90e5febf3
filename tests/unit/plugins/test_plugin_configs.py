"""The shipped configs build with the built-in plugins, behave as described, and config mistakes give a
ConfigError naming the file, the plugin and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.scheduling.config import ConfigError, load_config
from extproc.scheduling.plugins.pickers import MaxScorePicker, RandomPicker
from extproc.scheduling.plugins.prefix import PrefixCacheScorer

from plugin_testlib import MODEL, make_request


def _pool(n: int = 4) -> EndpointPool:
    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints([f"10.0.0.{i}:8000" for i in range(n)])
    return pool


@pytest.mark.parametrize("name", ["default", "prefix-load", "random", "load-only", "round-robin-like"])
def test_shipped_configs_build_and_schedule(name: str) -> None:
    pool = _pool()
    cfg = load_config(name, pool)
    profile = cfg.scheduler.profiles["default"]
    assert [f.type_name for f in profile.filters] == ["healthy-filter", "model-filter"]
    result, cycle = cfg.scheduler.schedule(make_request("p" * 300))
    assert result.primary in pool.snapshot()
    cfg.scheduler.dispatched(cycle, make_request("p" * 300), result)


def test_shipped_config_contents() -> None:
    weights = {
        name: {ws.scorer.type_name: ws.weight for ws in load_config(name, _pool()).scheduler.profiles["default"].scorers}
        for name in ("prefix-load", "load-only", "random", "round-robin-like")
    }
    assert weights["prefix-load"] == {
        "prefix-cache-scorer": 3.0,
        "queue-scorer": 1.0,
        "kv-cache-utilization-scorer": 1.0,
        "active-request-scorer": 1.0,
    }
    assert "prefix-cache-scorer" not in weights["load-only"]
    assert weights["random"] == {}
    assert weights["round-robin-like"] == {"active-request-scorer": 1.0}
    assert isinstance(load_config("random", _pool()).scheduler.profiles["default"].picker, RandomPicker)
    assert isinstance(load_config("prefix-load", _pool()).scheduler.profiles["default"].picker, MaxScorePicker)


def test_default_profile_keeps_a_repeated_prompt_on_its_pod() -> None:
    pool = _pool(8)
    sched = load_config("default", pool).scheduler
    prompt = "shared system prompt " * 50
    first, cycle = sched.schedule(make_request(prompt))
    sched.dispatched(cycle, make_request(prompt), first)
    for _ in range(10):
        again, _ = sched.schedule(make_request(prompt + " and a new question"))
        assert again.primary is first.primary


def test_prefix_load_affinity_versus_load() -> None:
    pool = _pool(4)
    sched = load_config("prefix-load", pool).scheduler
    prompt = "x" * 4096

    def dispatch(text: str) -> str:
        req = make_request(text)
        result, cycle = sched.schedule(req)
        sched.dispatched(cycle, req, result)
        result.primary.inflight += 1  # what the server does on dispatch
        return result.primary.address

    # A burst of cold, distinct prompts spreads over all pods by in-flight counts alone.
    assert len({dispatch(f"{i}" * 64 * 4) for i in range(4)}) == 4
    for e in pool.snapshot():
        e.inflight = 0
    home = dispatch(prompt)
    # In-flight imbalance alone does not break the affinity of a fully cached prompt (3 > 1)...
    assert all(dispatch(prompt) == home for _ in range(5))
    # ...but a half-cached prompt leaves a pod that is the most loaded by every measure (1.5 < 3).
    pool.get(home).metrics = PodMetrics(waiting=20, kv_usage=0.9)
    assert dispatch("x" * 2048 + "y" * 2048) != home


def test_round_robin_like_picks_least_in_flight() -> None:
    pool = _pool(3)
    for e, n in zip(pool.snapshot(), [5, 1, 3]):
        e.inflight = n
    sched = load_config("round-robin-like", pool).scheduler
    assert sched.schedule(make_request())[0].primary.address == "10.0.0.1:8000"


def test_unhealthy_and_wrong_model_pods_are_never_picked() -> None:
    pool = _pool(4)
    eps = pool.snapshot()
    eps[0].healthy = False
    eps[1].models = frozenset({"other"})
    eps[2].metrics = PodMetrics(waiting=100)
    sched = load_config("random", pool).scheduler
    assert {sched.schedule(make_request())[0].primary.address for _ in range(50)} == {eps[2].address, eps[3].address}


def test_prefix_index_is_registered_once_per_config() -> None:
    cfg = load_config("default", _pool())
    prefix = [p for p in cfg.plugins.values() if isinstance(p, PrefixCacheScorer)]
    assert len(prefix) == 1
    assert prefix[0] in cfg.scheduler.pre_request


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, _pool())
    assert ei.value.path == path
    assert path in str(ei.value)
    return ei.value


def test_error_unknown_type(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        """
plugins:
  - type: prefix-cache-scorrer
    name: pc
schedulingProfiles:
  - name: default
    plugins: [{pluginRef: pc}]
""",
    )
    assert err.plugin == "pc"
    assert "unknown plugin type 'prefix-cache-scorrer'" in err.reason
    assert "prefix-cache-scorer" in err.reason  # the known types are listed


def test_error_bad_parameters(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        """
plugins:
  - type: prefix-cache-scorer
    name: pc
    parameters: {blockSize: 0}
schedulingProfiles:
  - name: default
    plugins: [{pluginRef: pc, weight: 3}]
""",
    )
    assert err.plugin == "pc"
    assert "bad parameters for 'prefix-cache-scorer'" in err.reason
    assert "'blockSize' must be >= 1" in err.reason


def test_error_unknown_parameter_name(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        """
plugins:
  - type: max-score-picker
    parameters: {maxNumOfEndpoint: 2}
schedulingProfiles:
  - name: default
    plugins: [{pluginRef: max-score-picker}]
""",
    )
    assert err.plugin == "max-score-picker"
    assert "unknown parameter(s) 'maxNumOfEndpoint'" in err.reason
    assert "maxNumOfEndpoints" in err.reason


def test_error_undefined_plugin_ref(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        """
plugins:
  - type: queue-scorer
schedulingProfiles:
  - name: default
    plugins: [{pluginRef: queue-scorer}, {pluginRef: kv-scorer, weight: 2}]
""",
    )
    assert err.plugin == "kv-scorer"
    assert "undefined plugin" in err.reason


def test_error_two_pickers(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        """
plugins:
  - type: max-score-picker
  - type: random-picker
schedulingProfiles:
  - name: default
    plugins: [{pluginRef: max-score-picker}, {pluginRef: random-picker}]
""",
    )
    assert err.plugin == "random-picker"
    assert "two pickers" in err.reason
