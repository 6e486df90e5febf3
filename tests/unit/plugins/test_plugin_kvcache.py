from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.kvcache import KVCacheUtilizationScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_one_minus_usage(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i, kv_usage=u) for i, u in enumerate([0.0, 0.25, 0.9, 1.0])]
    s = KVCacheUtilizationScorer.from_config("kv", {}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([1.0, 0.75, 0.1, 0.0])


def test_out_of_range_usage_is_clamped(cycle: CycleState) -> None:
    eps = [make_endpoint(0, kv_usage=-0.5), make_endpoint(1, kv_usage=1.7)]
    assert KVCacheUtilizationScorer("kv").score(cycle, make_request(), eps) == [1.0, 0.0]


def test_absolute_not_relative(cycle: CycleState) -> None:
    # Two equally loaded pods keep their absolute score (no min-max normalisation).
    eps = [make_endpoint(0, kv_usage=0.6), make_endpoint(1, kv_usage=0.6)]
    assert KVCacheUtilizationScorer("kv").score(cycle, make_request(), eps) == pytest.approx([0.4, 0.4])
