"""disagg-profile-handler and the P/D deciders: decisions on fixed pod states, the header, config errors."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.plugin import PEER_ENDPOINT, PREFIX_CACHED_TOKENS, CycleState
from extproc.scheduling.config import ConfigError, build_config, load_config
from extproc.scheduling.plugins.pd_deciders import PrefixBasedPDDecider

from plugin_testlib import MODEL, make_request

PREFILL = "x-prefiller-host-port"
LONG = "word " * 2000  # ~2,500 tokens by the 4-characters estimate


def _pool() -> EndpointPool:
    """Pods 0,1 prefill; 2,3 decode; waiting = 10 × index (queue-scorer prefers the lowest index of each role)."""
    pool = EndpointPool(default_models=frozenset({MODEL}))
    addrs = [f"10.0.0.{i}:8000" for i in range(4)]
    pool.set_endpoints(addrs, {a: {"llm-d.ai/role": "prefill" if i < 2 else "decode"} for i, a in enumerate(addrs)})
    for i, e in enumerate(pool.snapshot()):
        e.metrics = PodMetrics(waiting=i * 10)
    return pool


def _cfg(decider: dict[str, Any] | None, handler_params: dict[str, Any] | None = None, prefix: bool = True) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = [{"type": "decode-filter"}, {"type": "prefill-filter"}, {"type": "queue-scorer"}]
    if prefix:
        plugins.append({"type": "prefix-cache-scorer"})
    hp = handler_params if handler_params is not None else {"deciders": {"prefill": "decider"}} if decider else {}
    plugins.append({"type": "disagg-profile-handler", "parameters": hp})
    if decider:
        plugins.append({"name": "decider", **decider})  # after the handler: resolved at configure time
    scorers = [{"pluginRef": "queue-scorer"}] + ([{"pluginRef": "prefix-cache-scorer", "weight": 0}] if prefix else [])
    return {
        "plugins": plugins,
        "schedulingProfiles": [
            {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}, *scorers]},
            {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}, *scorers]},
        ],
    }


def test_always_disagg_splits_decode_pod_is_destination() -> None:
    cfg = build_config(_cfg({"type": "always-disagg-pd-decider"}), _pool())
    result, cycle = cfg.scheduler.schedule(make_request("hi"))
    assert result.primary_profile == "decode"
    assert result.primary.address == "10.0.0.2:8000"
    assert result.headers == {PREFILL: "10.0.0.0:8000"}
    assert cycle.get(PEER_ENDPOINT).address == "10.0.0.2:8000"
    assert cfg.scheduler.owned_headers == (PREFILL, "x-encoder-hosts-ports")


def test_no_decider_means_decode_only() -> None:
    cfg = build_config(_cfg(None), _pool())
    result, _ = cfg.scheduler.schedule(make_request(LONG))
    assert result.primary.address == "10.0.0.2:8000" and result.headers == {}
    assert set(result.profile_results) == {"decode"}


@pytest.mark.parametrize(("threshold", "prompt", "split"), [(0, LONG, False), (16, LONG, True), (256, LONG, True),
                                                              (1024, LONG, True), (1024, "short prompt", False)])
def test_prefix_decider_thresholds_cold(threshold: int, prompt: str, split: bool) -> None:
    cfg = build_config(_cfg({"type": "prefix-based-pd-decider", "parameters": {"nonCachedTokens": threshold}}), _pool())
    result, _ = cfg.scheduler.schedule(make_request(prompt))
    assert (PREFILL in result.headers) is split


def test_prefix_decider_uses_the_decode_pods_cached_prefix() -> None:
    pool = _pool()
    cfg = build_config(_cfg({"type": "prefix-based-pd-decider", "parameters": {"nonCachedTokens": 256}}), pool)
    sched = cfg.scheduler
    r1 = make_request(LONG)
    res, cyc = sched.schedule(r1)
    assert PREFILL in res.headers
    sched.dispatched(cyc, r1, res)  # the decode pod (and the prefill pod) now hold the prompt's prefix
    res2, cyc2 = sched.schedule(make_request(LONG + "one more question"))
    assert res2.primary.address == "10.0.0.2:8000"
    assert cyc2.get(PREFIX_CACHED_TOKENS)["10.0.0.2:8000"] > 2000
    assert PREFILL not in res2.headers  # < 256 tokens not cached on the decode pod: prefill locally


def test_prefix_decider_prompt_tokens_gate_and_no_prefix_data() -> None:
    d = PrefixBasedPDDecider(non_cached_tokens=16, prompt_tokens=5000)
    ep = _pool().snapshot()[2]
    cyc = CycleState()
    cyc.set(PREFIX_CACHED_TOKENS, {})
    assert not d.disaggregate(cyc, make_request(LONG), ep)  # below promptTokens
    d2 = PrefixBasedPDDecider(non_cached_tokens=16)
    assert not d2.disaggregate(CycleState(), make_request(LONG), ep)  # no prefix data: the reference does not split
    assert d2.disaggregate(cyc, make_request(LONG), ep)
    assert d2.decisions == {"split": 1, "local": 1}


def test_no_prefill_pod_available_decodes_locally() -> None:
    pool = _pool()
    for e in pool.snapshot()[:2]:
        e.healthy = False
    cfg = build_config(_cfg({"type": "always-disagg-pd-decider"}), pool)
    result, _ = cfg.scheduler.schedule(make_request(LONG))
    assert result.primary.address == "10.0.0.2:8000" and result.headers == {}


def test_prefill_first_order() -> None:
    cfg = build_config(_cfg(None, {"stageOrder": "prefill-first"}), _pool())
    result, cycle = cfg.scheduler.schedule(make_request(LONG))
    assert result.primary_profile == "decode" and result.primary.address == "10.0.0.2:8000"
    assert result.headers == {PREFILL: "10.0.0.0:8000"}
    assert cycle.get(PEER_ENDPOINT).address == "10.0.0.0:8000"


def test_same_pod_for_both_stages_sets_no_header() -> None:
    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints(["10.0.0.9:8000"], {"10.0.0.9:8000": {"llm-d.ai/role": "prefill-decode"}})
    cfg = build_config(_cfg({"type": "always-disagg-pd-decider"}), pool)
    result, _ = cfg.scheduler.schedule(make_request(LONG))
    assert result.primary.address == "10.0.0.9:8000" and result.headers == {}


@pytest.mark.parametrize(("params", "why"), [
    ({"deciders": {"prefill": "missing"}}, "not defined"),
    ({"deciders": {"prefill": "queue-scorer"}}, "not a decider"),
    ({"stageOrder": "sideways"}, "stageOrder"),
    ({"stageOrder": "prefill-first", "deciders": {"prefill": "decider"}}, "not supported"),
    ({"profiles": {"decode": "nope"}}, "not configured"),
    ({"profiles": {"decode": "decode"}, "decodeProfile": "decode"}, "not both"),
    ({"bogus": 1}, "unknown parameter"),
])
def test_config_errors(params: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        build_config(_cfg({"type": "always-disagg-pd-decider"}, params), _pool())


def test_legacy_flat_parameters_and_shipped_config() -> None:
    cfg = build_config(_cfg({"type": "always-disagg-pd-decider"}, {"decodeProfile": "decode", "prefillProfile": "prefill",
                                                                    "deciderPluginName": "decider"}), _pool())
    result, _ = cfg.scheduler.schedule(make_request(LONG))
    assert PREFILL in result.headers
    shipped = load_config("pd", _pool())
    result, _ = shipped.scheduler.schedule(make_request(LONG))
    assert result.primary.address.startswith("10.0.0.") and result.headers[PREFILL] in ("10.0.0.0:8000", "10.0.0.1:8000")
