from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.running import RunningRequestsScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_min_max_over_running(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i, running=r, waiting=100 - r) for i, r in enumerate([4, 8, 12])]
    s = RunningRequestsScorer.from_config("r", {}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([1.0, 0.5, 0.0])


def test_all_equal(cycle: CycleState) -> None:
    eps = [make_endpoint(i, running=3) for i in range(3)]
    assert RunningRequestsScorer("r").score(cycle, make_request(), eps) == [1.0, 1.0, 1.0]
