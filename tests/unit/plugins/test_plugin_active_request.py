from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.active_request import ActiveRequestScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_fewer_in_flight_is_better(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i, waiting=0) for i in range(3)]
    for e, n in zip(eps, [2, 6, 10]):
        e.inflight = n
    s = ActiveRequestScorer.from_config("ar", {}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([1.0, 0.5, 0.0])


def test_reacts_to_own_counts_not_scraped_metrics(cycle: CycleState) -> None:
    a, b = make_endpoint(0, waiting=50), make_endpoint(1, waiting=0)
    a.inflight, b.inflight = 0, 3
    assert ActiveRequestScorer("ar").score(cycle, make_request(), [a, b]) == [1.0, 0.0]


def test_all_idle(cycle: CycleState) -> None:
    eps = [make_endpoint(i) for i in range(4)]
    assert ActiveRequestScorer("ar").score(cycle, make_request(), eps) == [1.0] * 4
