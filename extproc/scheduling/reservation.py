"""Pods kept free of batch work: which pods the batch band (sheddable requests, priority < 0) may use.

Why (docs/batch.md, "Benchmark"): an interactive request that lands on a pod running batch decodes waits for the
running engine step to end, then shares its step with them. A step that has started is not interrupted for a new
prefill (vLLM and ``extproc sim`` alike), so the wait does not shrink with fewer batch lines per pod. Keeping
``reservedPods`` pods without any batch work, and sending interactive requests there (``batch-free-scorer``),
removes that wait; batch fills the other pods.

The rule is one function, used by every place that must agree on it: the ``batch-reserve-filter`` (where a batch
request may go), the shed check (batch is saturated when the pods it may use are) and the
``x-gateway-batch-headroom`` count (the free slots of those pods only). The reserved pods are the ``reservedPods``
healthy pods with the fewest batch requests in flight (``Endpoint.inflight_batch``), ties by address. So on an idle
fleet the lowest addresses are reserved, a reserved pod stays reserved while it holds no batch work (nothing can
rank before it), and when one leaves the fleet the pod with the least batch work takes its place and drains.
At least one healthy pod is always left to batch: a fleet of ``reservedPods`` pods or fewer reserves one fewer.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.datalayer.endpoint import Endpoint
from extproc.services import ServiceKey

# the one default of ``reservedPods`` (the filter's parameter); 1 of 4 pods in the benchmark, where interactive
# traffic uses 14–17 % of the fleet
DEFAULT_RESERVED_PODS = 1


def _rank(e: Endpoint) -> tuple[int, str]:
    return (e.inflight_batch, e.address)


@dataclass(slots=True, frozen=True)
class BatchReservation:
    """``reserved_pods`` pods of the model's fleet kept free of batch work (see the module docstring)."""

    reserved_pods: int = DEFAULT_RESERVED_PODS

    def __post_init__(self) -> None:
        if self.reserved_pods < 0:
            raise ValueError("reservedPods must be >= 0")

    def reserved(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        """The reserved pods among ``candidates`` (healthy, not removed; at most all but one of them)."""
        k = self.reserved_pods
        if k <= 0:
            return []
        live = [e for e in candidates if e.healthy and not e.removed]
        k = min(k, len(live) - 1)
        if k <= 0:
            return []
        return heapq.nsmallest(k, live, key=_rank)

    def batch_pods(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        """``candidates`` without the reserved pods, in their order: where batch work may run."""
        held = self.reserved(candidates)
        if not held:
            return list(candidates)
        ids = {id(e) for e in held}
        return [e for e in candidates if id(e) not in ids]


# set by ``batch-reserve-filter`` when the config is loaded; read by the shed check and the headroom count
BATCH_RESERVATION: ServiceKey[BatchReservation] = ServiceKey("batch_reservation")
