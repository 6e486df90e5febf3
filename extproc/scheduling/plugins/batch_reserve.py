"""``batch-reserve-filter``: a batch-band request (sheddable, priority < 0) never goes to a reserved pod.

The reserved pods are ``reservedPods`` (default :data:`extproc.scheduling.reservation.DEFAULT_RESERVED_PODS`)
healthy pods of the request's model with the fewest batch requests in flight, ties by address (the rule and why:
:mod:`extproc.scheduling.reservation`). Other requests pass unchanged; ``batch-free-scorer`` sends interactive
requests to the pods this filter keeps free.

Building the filter registers its :class:`BatchReservation` as the ``batch_reservation`` service, so the shed
check (batch gets 429 ``saturated`` when the pods it may use are saturated, not the whole fleet) and the
``x-gateway-batch-headroom`` count (free slots of those pods only) apply the same rule. A config with two such
filters must give them the same ``reservedPods``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.scheduling.reservation import BATCH_RESERVATION, DEFAULT_RESERVED_PODS, BatchReservation
from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_int, register


@register
class BatchReserveFilter:
    type_name: ClassVar[str] = "batch-reserve-filter"
    __slots__ = ("name", "reservation")

    def __init__(self, name: str = "batch-reserve-filter", reserved_pods: int = DEFAULT_RESERVED_PODS) -> None:
        self.name = name
        self.reservation = BatchReservation(reserved_pods)

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "BatchReserveFilter":
        check_keys(params, ("reservedPods",))
        f = cls(name, get_int(params, "reservedPods", DEFAULT_RESERVED_PODS, minimum=0))
        have = ctx.services.get(BATCH_RESERVATION)
        if have is not None and have != f.reservation:
            raise ValueError(f"reservedPods {f.reservation.reserved_pods} differs from another batch-reserve-filter's {have.reserved_pods}")
        ctx.services[BATCH_RESERVATION] = f.reservation
        return f

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        if not request.sheddable:
            return candidates
        model = request.target_model
        pods = [e for e in candidates if model in e.models]
        return self.reservation.batch_pods(pods if pods else candidates)
