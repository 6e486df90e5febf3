"""Profile handlers and the plugin SDK's role assignment: decisions on fixed pod states, config errors at load."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.plugin import (
    CycleState,
    Decider,
    PluginContext,
    ProfileHandler,
    ProfileResults,
    SchedulingError,
    SchedulingProfile,
    SchedulingResult,
    Scorer,
    register,
    roles_of,
)
from extproc.scheduling import registry
from extproc.scheduling.config import ConfigError, build_config

from plugin_testlib import MODEL, make_request


def _pool() -> EndpointPool:
    """Four pods: 0,1 labelled prefill; 2,3 decode. Pod waiting = 10 × index, so queue-scorer prefers low index."""
    pool = EndpointPool(default_models=frozenset({MODEL}))
    addrs = [f"10.0.0.{i}:8000" for i in range(4)]
    pool.set_endpoints(addrs, {a: {"llm-d.ai/role": "prefill" if i < 2 else "decode"} for i, a in enumerate(addrs)})
    for i, e in enumerate(pool.snapshot()):
        e.metrics = PodMetrics(waiting=i * 10)
    return pool


def _cfg(handler: dict[str, Any] | None, profiles: list[str]) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = [{"type": "queue-scorer"}]
    if handler is not None:
        plugins.append(handler)
    return {
        "plugins": plugins,
        "schedulingProfiles": [{"name": p, "plugins": [{"pluginRef": "queue-scorer"}]} for p in profiles],
    }


def test_single_profile_is_implicit_and_primary() -> None:
    cfg = build_config(_cfg(None, ["default"]), _pool())
    result, _ = cfg.scheduler.schedule(make_request())
    assert result.primary_profile == "default"
    assert result.primary.address == "10.0.0.0:8000"
    assert result.headers == {}
    assert cfg.scheduler.handler.type_name == "single-profile-handler"


def test_explicit_single_profile_handler_accepts_one_profile() -> None:
    cfg = build_config(_cfg({"type": "single-profile-handler"}, ["default"]), _pool())
    result, _ = cfg.scheduler.schedule(make_request())
    assert result.primary.address == "10.0.0.0:8000"


def test_single_profile_handler_rejects_two_profiles_at_load() -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(_cfg({"type": "single-profile-handler"}, ["a", "b"]), _pool(), path="x.yaml")
    assert ei.value.plugin == "single-profile-handler"
    assert "exactly one profile" in ei.value.reason


def test_two_profiles_without_handler_fail_at_load() -> None:
    with pytest.raises(ConfigError, match="need a profile handler"):
        build_config(_cfg(None, ["a", "b"]), _pool())


def test_two_handlers_fail_at_load() -> None:
    raw = _cfg({"type": "single-profile-handler"}, ["default"])
    raw["plugins"].append({"type": "header-profile-handler"})
    with pytest.raises(ConfigError, match="one profile handler"):
        build_config(raw, _pool())


def _role_cfg() -> dict[str, Any]:
    return {
        "plugins": [
            {"type": "queue-scorer"},
            {"type": "header-profile-handler", "parameters": {"headerName": "X-Stage", "defaultProfile": "decode"}},
            {"type": "label-selector-filter", "name": "only-prefill", "parameters": {"matchLabels": {"llm-d.ai/role": "prefill"}}},
            {"type": "label-selector-filter", "name": "only-decode", "parameters": {"matchLabels": {"llm-d.ai/role": "decode"}}},
        ],
        "schedulingProfiles": [
            {"name": "prefill", "plugins": [{"pluginRef": "only-prefill"}, {"pluginRef": "queue-scorer"}]},
            {"name": "decode", "plugins": [{"pluginRef": "only-decode"}, {"pluginRef": "queue-scorer"}]},
        ],
    }


def test_header_profile_handler_picks_profile_by_header() -> None:
    cfg = build_config(_role_cfg(), _pool())
    # header names are matched case-insensitively (the server lower-cases them); the value is the profile name
    r, _ = cfg.scheduler.schedule(make_request(headers={"x-stage": "prefill"}))
    assert (r.primary_profile, r.primary.address) == ("prefill", "10.0.0.0:8000")
    r, _ = cfg.scheduler.schedule(make_request(headers={"x-stage": " decode "}))
    assert (r.primary_profile, r.primary.address) == ("decode", "10.0.0.2:8000")
    r, _ = cfg.scheduler.schedule(make_request())  # missing header → defaultProfile
    assert r.primary_profile == "decode"
    with pytest.raises(SchedulingError) as ei:
        cfg.scheduler.schedule(make_request(headers={"x-stage": "encode"}))
    assert ei.value.status == 400
    assert ei.value.code == "unknown_scheduling_profile"
    assert ei.value.error_type == "invalid_request_error"


def test_header_profile_handler_defaults() -> None:
    raw = _cfg({"type": "header-profile-handler"}, ["prefill", "decode"])
    cfg = build_config(raw, _pool())
    h = cfg.scheduler.handler
    assert (h.header_name, h.default_profile) == ("epp-profile", "decode")
    r, _ = cfg.scheduler.schedule(make_request(headers={"epp-profile": "prefill"}))
    assert r.primary_profile == "prefill"


def test_header_profile_handler_single_profile_ignores_header() -> None:
    cfg = build_config(_cfg({"type": "header-profile-handler"}, ["only"]), _pool())
    r, _ = cfg.scheduler.schedule(make_request(headers={"epp-profile": "nonsense"}))
    assert r.primary_profile == "only"


def test_header_profile_handler_unknown_default_fails_at_load() -> None:
    raw = _cfg({"type": "header-profile-handler", "parameters": {"defaultProfile": "nope"}}, ["a", "b"])
    with pytest.raises(ConfigError, match="defaultProfile 'nope'"):
        build_config(raw, _pool())


# ---------------------------------------------------------------- a handler that sets an upstream header
class _TwoStageHandler:
    """Runs 'b' then 'a' (two rounds); 'a' is primary, 'b''s pick travels in x-test-peer."""

    type_name: ClassVar[str] = "test-two-stage-handler"
    owned_headers: ClassVar[tuple[str, ...]] = ("x-test-peer",)

    def __init__(self, name: str = "test-two-stage-handler", leak: bool = False) -> None:
        self.name = name
        self.leak = leak
        self.rounds = 0

    def configure(self, profiles: dict[str, SchedulingProfile]) -> None:
        if set(profiles) != {"a", "b"}:
            raise ValueError("needs profiles a and b")

    def pick_profiles(self, cycle: CycleState, request: Any, profiles: dict[str, SchedulingProfile], results: ProfileResults) -> list[SchedulingProfile]:
        self.rounds += 1
        if "b" not in results:
            return [profiles["b"]]
        if "a" not in results:
            return [profiles["a"]]
        return []

    def process_results(self, cycle: CycleState, request: Any, results: ProfileResults) -> SchedulingResult:
        a, b = results["a"], results["b"]
        assert a is not None and b is not None
        headers = {"x-test-peer": b.targets[0].address}
        if self.leak:
            headers["x-gateway-destination-endpoint"] = "6.6.6.6:1"
        return SchedulingResult({"a": a, "b": b}, "a", headers)


@pytest.fixture
def two_stage() -> Any:
    saved = dict(registry.PLUGIN_TYPES)
    register(_TwoStageHandler)
    yield _TwoStageHandler
    registry.PLUGIN_TYPES.clear()
    registry.PLUGIN_TYPES.update(saved)


def test_multi_profile_handler_rounds_and_headers(two_stage: Any) -> None:
    raw = _cfg({"type": "test-two-stage-handler"}, ["a", "b"])
    cfg = build_config(raw, _pool())
    r, _ = cfg.scheduler.schedule(make_request())
    assert r.primary_profile == "a"
    assert r.headers == {"x-test-peer": "10.0.0.0:8000"}
    assert [p for p, _ in r.endpoints()] == ["a", "b"]
    assert cfg.scheduler.owned_headers == ("x-test-peer",)
    assert cfg.scheduler.handler.rounds == 3


def test_handler_may_not_set_undeclared_headers(two_stage: Any) -> None:
    raw = _cfg({"type": "test-two-stage-handler", "parameters": {"leak": True}}, ["a", "b"])
    cfg = build_config(raw, _pool())
    with pytest.raises(SchedulingError) as ei:
        cfg.scheduler.schedule(make_request())
    assert ei.value.status == 500 and "x-gateway-destination-endpoint" in ei.value.message


def test_handler_configure_error_names_plugin(two_stage: Any) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(_cfg({"type": "test-two-stage-handler", "name": "stages"}, ["a", "c"]), _pool(), path="f.yaml")
    assert (ei.value.path, ei.value.plugin) == ("f.yaml", "stages")


# ---------------------------------------------------------------- roles by protocol
class _OnlyScore:
    type_name: ClassVar[str] = "only-score"

    def __init__(self) -> None:
        self.name = "s"

    def score(self, cycle: Any, request: Any, candidates: Any) -> list[float]:
        return [0.0] * len(candidates)


class _DeclaresPicker(_OnlyScore):
    plugin_roles: ClassVar[frozenset[str]] = frozenset({"scorer", "picker"})


class _Decider:
    type_name: ClassVar[str] = "d"

    def __init__(self) -> None:
        self.name = "d"

    def disaggregate(self, cycle: Any, request: Any, endpoint: Any) -> bool:
        return True


def test_roles_by_protocol() -> None:
    assert roles_of(_OnlyScore()) == {"scorer"}
    assert isinstance(_OnlyScore(), Scorer)
    assert roles_of(_Decider()) == {"decider"}
    assert isinstance(_Decider(), Decider)
    assert not isinstance(_Decider(), ProfileHandler)
    with pytest.raises(TypeError, match="picker"):
        roles_of(_DeclaresPicker())


def test_builtin_handlers_satisfy_protocol() -> None:
    ctx = PluginContext(pool=_pool())
    for t in ("single-profile-handler", "header-profile-handler"):
        h = registry.PLUGIN_TYPES[t](t, {}, ctx)
        assert roles_of(h) == {"profile_handler"}, t
