"""P/D deciders: per request, should the prefill run on a separate prefill pod? (llm-d-router
pkg/epp/framework/plugins/scheduling/profilehandler/disagg/prefix_based_pd_decider.go, always_disagg_pd_decider.go)

- ``prefix-based-pd-decider``: split when the prompt's tokens *not* already cached on the chosen decode pod are
  at least ``nonCachedTokens`` (0 = never split), and the prompt has at least ``promptTokens`` tokens (0 = no
  minimum). Cached tokens come from the decode profile's prefix scorer (``PREFIX_CACHED_TOKENS``: the approximate
  ``prefix-cache-scorer`` estimates matched bytes / 4, ``precise-prefix-cache-scorer`` counts KV blocks ×
  their size). Prompt tokens: the tokenizer's count when the request was tokenized, else characters / 4 (the
  reference counts 0 without a tokenizer and never splits then).
  With no prefix data in the cycle (no prefix scorer in the decode profile) it does not split, as the reference.
- ``always-disagg-pd-decider``: always split.

Both count their answers (``decisions``: split / local) for tests and the benchmark report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    PREFIX_CACHED_TOKENS,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    check_keys,
    get_int,
    register,
)

log = logging.getLogger(__name__)


def prompt_tokens(request: InferenceRequest) -> int:
    ids = request.prompt_token_ids
    return len(ids) if ids else request.prompt_tokens_estimate


@register
class PrefixBasedPDDecider:
    type_name: ClassVar[str] = "prefix-based-pd-decider"
    __slots__ = ("name", "non_cached_tokens", "prompt_tokens", "decisions", "_warned")

    def __init__(self, name: str = "prefix-based-pd-decider", non_cached_tokens: int = 0, prompt_tokens: int = 0) -> None:
        if non_cached_tokens < 0 or prompt_tokens < 0:
            raise ValueError("nonCachedTokens and promptTokens must be >= 0")
        self.name = name
        self.non_cached_tokens = non_cached_tokens
        self.prompt_tokens = prompt_tokens
        self.decisions = {"split": 0, "local": 0}
        self._warned = False

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PrefixBasedPDDecider":
        check_keys(params, ("nonCachedTokens", "promptTokens"))
        return cls(name, get_int(params, "nonCachedTokens", 0, minimum=0), get_int(params, "promptTokens", 0, minimum=0))

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        split = self._decide(cycle, request, endpoint)
        self.decisions["split" if split else "local"] += 1
        return split

    def _decide(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        threshold = self.non_cached_tokens
        if threshold == 0 or endpoint is None:
            return False
        n = prompt_tokens(request)
        if (self.prompt_tokens and n < self.prompt_tokens) or n < threshold:
            return False
        cached_by_pod = cycle.get(PREFIX_CACHED_TOKENS)
        if cached_by_pod is None:
            if not self._warned:
                self._warned = True
                log.warning("prefix-based-pd-decider: no prefix-cache data in the cycle (put a prefix scorer in the "
                            "decode profile); not splitting", extra={"plugin": self.name})
            return False
        return n - cached_by_pod.get(endpoint.address, 0) >= threshold


@register
class AlwaysDisaggPDDecider:
    type_name: ClassVar[str] = "always-disagg-pd-decider"
    __slots__ = ("name", "decisions")

    def __init__(self, name: str = "always-disagg-pd-decider") -> None:
        self.name = name
        self.decisions = {"split": 0, "local": 0}

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "AlwaysDisaggPDDecider":
        check_keys(params, ())
        return cls(name)

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        self.decisions["split"] += 1
        return True
