from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.queue import QueueScorer, min_max_lower_is_better
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_min_max_exact_scores(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i, waiting=w) for i, w in enumerate([0, 5, 10, 2])]
    s = QueueScorer.from_config("q", {}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([1.0, 0.5, 0.0, 0.8])


@pytest.mark.parametrize("waiting", [[0, 0, 0], [7, 7], [3]])
def test_all_equal_or_single_pod_scores_one(ctx: PluginContext, cycle: CycleState, waiting: list[int]) -> None:
    eps = [make_endpoint(i, waiting=w) for i, w in enumerate(waiting)]
    assert QueueScorer("q").score(cycle, make_request(), eps) == [1.0] * len(waiting)


def test_empty_candidates() -> None:
    assert min_max_lower_is_better([]) == []


def test_no_parameters_accepted(ctx: PluginContext) -> None:
    with pytest.raises(ValueError, match="unknown parameter.*'weight'"):
        QueueScorer.from_config("q", {"weight": 2}, ctx)
