from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.lora import LoraAffinityScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request

ADAPTER = "sql-lora"


def test_lora_tiers(ctx: PluginContext, cycle: CycleState) -> None:
    models = ("base-model", ADAPTER)
    active = make_endpoint(0, models, running_loras=frozenset({ADAPTER, "x"}), max_loras=2)
    free_slot = make_endpoint(1, models, running_loras=frozenset({"x"}), max_loras=2)
    waiting = make_endpoint(2, models, running_loras=frozenset({"x"}), waiting_loras=frozenset({ADAPTER}), max_loras=2)
    full = make_endpoint(3, models, running_loras=frozenset({"x", "y"}), max_loras=2)
    # Free slot outranks "waiting" (GIE order): waiting with a free slot left still gets 0.8.
    waiting_with_room = make_endpoint(4, models, waiting_loras=frozenset({ADAPTER}), max_loras=4)
    s = LoraAffinityScorer.from_config("lora", {}, ctx).score(
        cycle, make_request(model=ADAPTER), [active, free_slot, waiting, full, waiting_with_room]
    )
    assert s == [1.0, 0.8, 0.6, 0.0, 0.8]


def test_base_model_on_pods_without_lora_scores_one(cycle: CycleState) -> None:
    eps = [make_endpoint(i, max_loras=0) for i in range(3)]
    assert LoraAffinityScorer("lora").score(cycle, make_request(model="base-model"), eps) == [1.0, 1.0, 1.0]


def test_base_models_parameter(ctx: PluginContext, cycle: CycleState) -> None:
    full = make_endpoint(0, running_loras=frozenset({"x", "y"}), max_loras=2)
    scorer = LoraAffinityScorer.from_config("lora", {"baseModels": ["base-model"]}, ctx)
    assert scorer.score(cycle, make_request(model="base-model"), [full]) == [1.0]
    # Without it, a full LoRA pod cannot tell base from adapter and scores 0.
    assert LoraAffinityScorer("lora").score(cycle, make_request(model="base-model"), [full]) == [0.0]


def test_bad_base_models(ctx: PluginContext) -> None:
    with pytest.raises(TypeError, match="baseModels"):
        LoraAffinityScorer.from_config("lora", {"baseModels": "base-model"}, ctx)
