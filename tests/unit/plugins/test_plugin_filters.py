from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.filters import HealthyFilter, ModelFilter
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_healthy_filter_drops_unhealthy_and_removed(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i) for i in range(4)]
    eps[1].healthy = False
    eps[2].removed = True
    f = HealthyFilter.from_config("h", {}, ctx)
    assert f.filter(cycle, make_request(), eps) == [eps[0], eps[3]]
    assert f.name == "h"


def test_healthy_filter_rejects_parameters(ctx: PluginContext) -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        HealthyFilter.from_config("h", {"x": 1}, ctx)


def test_model_filter_keeps_pods_serving_target_model_and_adapters(ctx: PluginContext, cycle: CycleState) -> None:
    a = make_endpoint(1, models=("base-model", "sql-lora"))
    b = make_endpoint(2, models=("base-model",))
    c = make_endpoint(3, models=("other",))
    f = ModelFilter.from_config("m", {}, ctx)
    assert f.filter(cycle, make_request(model="base-model"), [a, b, c]) == [a, b]
    assert f.filter(cycle, make_request(model="sql-lora"), [a, b, c]) == [a]
    assert f.filter(cycle, make_request(model="nope"), [a, b, c]) == []


def test_model_filter_uses_target_model_after_rewrite(ctx: PluginContext, cycle: CycleState) -> None:
    a = make_endpoint(1, models=("rewritten",))
    b = make_endpoint(2, models=("asked",))
    req = make_request(model="asked", headers={"x-gateway-model-name-rewrite": "rewritten"})
    assert ModelFilter("m").filter(cycle, req, [a, b]) == [a]


def test_model_filter_unknown_models(ctx: PluginContext, cycle: CycleState) -> None:
    undiscovered = make_endpoint(1, models=())
    known = make_endpoint(2)
    req = make_request()
    assert ModelFilter.from_config("m", {}, ctx).filter(cycle, req, [undiscovered, known]) == [known]
    lenient = ModelFilter.from_config("m", {"allowUnknown": True}, ctx)
    assert lenient.filter(cycle, req, [undiscovered, known]) == [undiscovered, known]
    with pytest.raises(TypeError, match="allowUnknown"):
        ModelFilter.from_config("m", {"allowUnknown": "yes"}, ctx)
