"""``token-load-scorer``: 1 − min(in-flight tokens, maxTokens) / maxTokens.

In-flight tokens = ``Endpoint.inflight_prefill_tokens`` (prompt tokens of requests not yet past their first
token) + ``Endpoint.inflight_decode_tokens`` (budgeted output tokens of requests in decode), both kept by the
server. Unlike a min–max score this is absolute: two idle pods both score 1.0 and a pod at ``maxTokens`` or more
scores 0. The reference (llm-d-router .../scorer/tokenload) has the same formula and names the cap
``queueThresholdTokens`` (default 4194304, applied to llm-d.ai/v1alpha1 files); that name is accepted as an alias
of ``maxTokens``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_int, register

DEFAULT_MAX_TOKENS = 65536


@register
class TokenLoadScorer:
    type_name: ClassVar[str] = "token-load-scorer"
    __slots__ = ("name", "max_tokens")

    def __init__(self, name: str = "token-load-scorer", max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens <= 0:
            raise ValueError(f"parameter 'maxTokens' must be > 0, got {max_tokens}")
        self.name = name
        self.max_tokens = max_tokens

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "TokenLoadScorer":
        check_keys(params, ("maxTokens", "queueThresholdTokens"))
        if "maxTokens" in params and "queueThresholdTokens" in params:
            raise ValueError("give 'maxTokens' or its alias 'queueThresholdTokens', not both")
        key = "queueThresholdTokens" if "queueThresholdTokens" in params else "maxTokens"
        return cls(name, get_int(params, key, DEFAULT_MAX_TOKENS, minimum=1))

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        t = self.max_tokens
        ft = float(t)
        out: list[float] = []
        for e in candidates:
            n = e.inflight_prefill_tokens + e.inflight_decode_tokens
            out.append(1.0 if n <= 0 else 0.0 if n >= t else 1.0 - n / ft)
        return out
