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
- ``queue-aware-pd-decider`` (ours; the idea of NVIDIA Dynamo's conditional disaggregation, which prefills on the
  decode worker when the prefill queue is long): the prefix-based rule, and then — when ``maxPrefillQueueTokens``
  > 0 — prefill on the decode pod instead when the prefill pool is queued: every healthy prefill pod serving the
  model has at least ``maxPrefillQueueTokens`` prompt tokens in flight (outstanding prefill work, counted by the
  tracker at decision time, not scraped) and the chosen decode pod's own outstanding prefill work is smaller than
  the least-loaded prefill pod's by at least that much (so its local prefill starts sooner). Bounded: one pass over
  the pool's pods.

Both count their answers (``decisions``: split / local) for tests and the benchmark report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    PREFIX_CACHED_TOKENS,
    EndpointPool,
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


PREFILL_ROLE_LABEL = "llm-d.ai/role"
_PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})


@register
class QueueAwarePDDecider(PrefixBasedPDDecider):
    type_name: ClassVar[str] = "queue-aware-pd-decider"
    __slots__ = ("pool", "max_prefill_queue_tokens")

    def __init__(self, name: str = "queue-aware-pd-decider", non_cached_tokens: int = 0, prompt_tokens: int = 0,
                 max_prefill_queue_tokens: int = 0, pool: EndpointPool | None = None) -> None:
        super().__init__(name, non_cached_tokens, prompt_tokens)
        if max_prefill_queue_tokens < 0:
            raise ValueError("maxPrefillQueueTokens must be >= 0")
        self.max_prefill_queue_tokens = max_prefill_queue_tokens
        self.pool = pool
        self.decisions["local_queued"] = 0  # prefilled on the decode pod because the prefill pool was queued

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "QueueAwarePDDecider":
        check_keys(params, ("nonCachedTokens", "promptTokens", "maxPrefillQueueTokens"))
        return cls(name, get_int(params, "nonCachedTokens", 0, minimum=0), get_int(params, "promptTokens", 0, minimum=0),
                   get_int(params, "maxPrefillQueueTokens", 0, minimum=0), ctx.pool)

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        split = self._decide(cycle, request, endpoint)
        if split and endpoint is not None and self.max_prefill_queue_tokens > 0 and self._prefill_pool_queued(request, endpoint):
            self.decisions["local_queued"] += 1
            split = False
        self.decisions["split" if split else "local"] += 1
        return split

    def _prefill_pool_queued(self, request: InferenceRequest, decode_pod: Endpoint) -> bool:
        pool = self.pool
        if pool is None:
            return False
        q = self.max_prefill_queue_tokens
        model = request.target_model
        least = -1
        for e in pool.snapshot():
            if e is decode_pod or not e.healthy or e.removed or (e.models and model not in e.models):
                continue
            if e.labels.get(PREFILL_ROLE_LABEL) not in _PREFILL_ROLES:
                continue
            w = e.inflight_prefill_tokens
            if w < q:
                return False  # a prefill pod with (almost) no queue: split as usual
            if least < 0 or w < least:
                least = w
        if least < 0:
            return False  # no prefill pod known: the handler finds none and the decode pod prefills anyway
        return decode_pod.inflight_prefill_tokens + q <= least
