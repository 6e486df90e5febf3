from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.session_affinity import SessionAffinityScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request, result_for


def test_session_sticks_to_last_pod(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i) for i in range(3)]
    scorer = SessionAffinityScorer.from_config("sa", {}, ctx)
    req = make_request(headers={"x-session-token": "abc"})
    assert scorer.score(cycle, req, eps) == [0.0, 0.0, 0.0]
    scorer.pre_request(cycle, req, result_for(eps[2]))
    assert scorer.score(CycleState(), req, eps) == [0.0, 0.0, 1.0]
    # Re-dispatched elsewhere (e.g. pod 2 overloaded): the session follows the newest pod.
    scorer.pre_request(CycleState(), req, result_for(eps[0]))
    assert scorer.score(CycleState(), req, eps) == [1.0, 0.0, 0.0]
    # Other sessions and header-less requests are unaffected.
    assert scorer.score(CycleState(), make_request(headers={"x-session-token": "zzz"}), eps) == [0.0] * 3
    assert scorer.score(CycleState(), make_request(), eps) == [0.0] * 3


def test_no_header_is_not_remembered(ctx: PluginContext, cycle: CycleState) -> None:
    scorer = SessionAffinityScorer.from_config("sa", {}, ctx)
    scorer.pre_request(cycle, make_request(), result_for(make_endpoint(0)))
    assert len(scorer) == 0


def test_lru_bound(ctx: PluginContext) -> None:
    scorer = SessionAffinityScorer.from_config("sa", {"maxSessions": 2}, ctx)
    ep = make_endpoint(0)
    for tok in ("a", "b", "a", "c"):  # "a" refreshed, so "b" is the oldest when "c" arrives
        scorer.pre_request(CycleState(), make_request(headers={"x-session-token": tok}), result_for(ep))
    assert len(scorer) == 2
    assert scorer.target_of("a") == ep.address
    assert scorer.target_of("b") is None
    assert scorer.target_of("c") == ep.address


def test_custom_header(ctx: PluginContext) -> None:
    scorer = SessionAffinityScorer.from_config("sa", {"headerName": "X-Conversation-Id"}, ctx)
    ep = make_endpoint(0)
    req = make_request(headers={"x-conversation-id": "c1"})
    scorer.pre_request(CycleState(), req, result_for(ep))
    assert scorer.score(CycleState(), req, [ep]) == [1.0]


@pytest.mark.parametrize("params", [{"maxSessions": 0}, {"headerName": ""}, {"ttl": 5}])
def test_bad_parameters(ctx: PluginContext, params: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        SessionAffinityScorer.from_config("sa", params, ctx)
