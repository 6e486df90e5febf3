from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.load_aware import LoadAwareScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_default_threshold(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i, waiting=w) for i, w in enumerate([0, 32, 64, 128, 500])]
    s = LoadAwareScorer.from_config("la", {}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([0.5, 0.375, 0.25, 0.0, 0.0])


def test_custom_threshold(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(0, waiting=1), make_endpoint(1, waiting=10)]
    s = LoadAwareScorer.from_config("la", {"threshold": 4}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([0.375, 0.0])


@pytest.mark.parametrize("bad", [0, -3, 1.5, "8", True])
def test_bad_threshold(ctx: PluginContext, bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="threshold"):
        LoadAwareScorer.from_config("la", {"threshold": bad}, ctx)
