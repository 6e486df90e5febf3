"""``inflight-limit-filter``: drop pods that already hold ``maxInflight`` of our in-flight requests.

Why: scraped metrics lag by up to one scrape interval, so a burst of requests sharing a prefix is scheduled
before any scrape shows the first pod's queue; the prefix scorer (weight 3) then outweighs the load scorers
and the whole burst lands on one pod (a known complaint about the reference schedulers). Our own in-flight
count is exact and immediate; capping it per pod at the pod's real concurrency (vLLM's ``--max-num-seqs`` plus
the queue depth you tolerate) bounds a burst at once.

If every candidate is at the cap, all are kept: admission (saturation, flow control) decides what happens next,
never this filter. Rejected alternative: scaling the queue scorer by our own dispatches since the last scrape —
min–max normalisation makes a full prefix match (3) outweigh any queue difference (2) anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_int, register


@register
class InflightLimitFilter:
    type_name: ClassVar[str] = "inflight-limit-filter"
    __slots__ = ("name", "max_inflight")

    def __init__(self, name: str = "inflight-limit-filter", max_inflight: int = 64) -> None:
        if max_inflight < 1:
            raise ValueError("maxInflight must be >= 1")
        self.name = name
        self.max_inflight = max_inflight

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "InflightLimitFilter":
        check_keys(params, ("maxInflight",))
        if "maxInflight" not in params:
            raise ValueError("parameter 'maxInflight' is required (the per-pod concurrency you allow, e.g. vLLM's --max-num-seqs)")
        return cls(name, get_int(params, "maxInflight", 64, minimum=1))

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        limit = self.max_inflight
        kept = [e for e in candidates if e.inflight < limit]
        return kept if kept else candidates
