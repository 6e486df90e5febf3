"""``lora-affinity-scorer``: prefer pods where the requested LoRA adapter is already loaded.

Tiers (GIE pkg/epp/scheduling/framework/plugins/loraaffinityscorer/lora_affinity.go), from
``vllm:lora_requests_info``:

- 1.0 the adapter is running on the pod;
- 0.8 the pod has a free adapter slot (``len(running) + len(waiting) < max_lora``);
- 0.6 the adapter is waiting to be loaded on the pod;
- 0.0 otherwise (all slots busy with other adapters).

A base-model request scores 1.0 everywhere: on a pod without LoRA support (``max_lora == 0``) the target can
only be the base model (``model-filter`` already checked the pod serves it), and models listed in the
``baseModels`` parameter are never treated as adapters (on LoRA-enabled pods the scraped metrics cannot tell a
base model from a cold adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_str_list, register

SCORE_ACTIVE = 1.0
SCORE_FREE_SLOT = 0.8
SCORE_WAITING = 0.6
SCORE_NONE = 0.0


@register
class LoraAffinityScorer:
    type_name: ClassVar[str] = "lora-affinity-scorer"
    __slots__ = ("name", "base_models")

    def __init__(self, name: str = "lora-affinity-scorer", base_models: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.base_models = base_models

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "LoraAffinityScorer":
        check_keys(params, ("baseModels",))
        return cls(name, frozenset(get_str_list(params, "baseModels")))

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        target = request.target_model
        if target in self.base_models:
            return [1.0] * len(candidates)
        out: list[float] = []
        for e in candidates:
            m = e.metrics
            running = m.running_loras
            waiting = m.waiting_loras
            if target in running:
                out.append(SCORE_ACTIVE)
            elif m.max_loras <= 0 and target not in waiting:
                out.append(1.0)  # no LoRA on this pod: the target is its base model
            elif len(running) + len(waiting) < m.max_loras:
                out.append(SCORE_FREE_SLOT)
            elif target in waiting:
                out.append(SCORE_WAITING)
            else:
                out.append(SCORE_NONE)
        return out
