"""``always-disagg-multimodal-decider``: the encode-stage decider of the disaggregation handler — yes for a request
that carries multimodal content, no for text only.

Reference: llm-d-router pkg/epp/framework/plugins/scheduling/profilehandler/disagg (always_disagg_mm_decider.go):
true when a chat message's content list has a block of type ``image_url``, ``video_url`` or ``input_audio``. No
parameters. Cheap: one pass over the parsed messages, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, register

MULTIMODAL_BLOCKS = frozenset({"image_url", "video_url", "input_audio"})


def has_multimodal_content(body: Mapping[str, Any]) -> bool:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):
            for block in content:
                if isinstance(block, Mapping) and block.get("type") in MULTIMODAL_BLOCKS:
                    return True
    return False


@register
class AlwaysDisaggMultimodalDecider:
    type_name: ClassVar[str] = "always-disagg-multimodal-decider"
    __slots__ = ("name",)

    def __init__(self, name: str = "always-disagg-multimodal-decider") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "AlwaysDisaggMultimodalDecider":
        check_keys(params, ())
        return cls(name)

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        return has_multimodal_content(request.body)
