"""Flow-control fairness policies of the reference that need no state beyond the queues.

Reference: llm-d-router pkg/epp/framework/plugins/flowcontrol/fairness/{roundrobin,globalstrict}.

- ``round-robin-fairness-policy``: fairness keys take turns (extproc's default when no policy is named).
- ``global-strict-fairness-policy``: no fairness between keys — the key whose head request has waited longest goes
  next, so a band behaves as one FIFO queue (the reference's default when flow control is on; extproc's default
  stays round robin, see docs/plugins.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import PluginContext, check_keys, register


@register
class RoundRobinFairnessPolicy:
    type_name: ClassVar[str] = "round-robin-fairness-policy"
    __slots__ = ("name", "_order")

    def __init__(self, name: str = "round-robin-fairness-policy") -> None:
        self.name = name
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently served first

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "RoundRobinFairnessPolicy":
        check_keys(params, ())
        return cls(name)

    def pick_tenant(self, queues: dict[str, tuple[int, float]], now: float) -> str:
        for t in queues:
            if t not in self._order:
                self._order[t] = None
        for t in list(self._order):
            if t not in queues:
                del self._order[t]  # forget keys that stopped waiting; they rejoin at the back
        for t in self._order:
            if queues[t][0] > 0:
                self._order.move_to_end(t)
                return t
        return next(iter(queues))


@register
class GlobalStrictFairnessPolicy:
    type_name: ClassVar[str] = "global-strict-fairness-policy"
    __slots__ = ("name",)

    def __init__(self, name: str = "global-strict-fairness-policy") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "GlobalStrictFairnessPolicy":
        check_keys(params, ())
        return cls(name)

    def pick_tenant(self, queues: dict[str, tuple[int, float]], now: float) -> str:
        return min((t for t, (n, _) in queues.items() if n > 0), key=lambda t: queues[t][1], default=next(iter(queues)))
