"""``soft-reflective-ceiling-policy``: a flow-control usage-limit policy — lower-priority bands are held back first
as pool saturation rises, the highest band is never held below saturation 1.

Reference: llm-d-router pkg/epp/framework/plugins/flowcontrol/usagelimits/softreflectiveceiling. For N bands ranked
highest first and pool saturation s (our detector's ``level``: mean roofline max(waiting/QD, KV/KVT) over pods with
fresh metrics): band 0's ceiling is 1; band i's reflective ceiling is 1 − i·s/(N−1). A band below its reflective
ceiling is open (ceiling 1); at s ≥ 1 every band but the first is closed (0); otherwise it alternates open/closed
across calls with period round(s / (1 − s)), one tick shared by all bands (open 1 in ``period`` calls). A band is
held while s ≥ its ceiling. One band → always open. No parameters (a non-empty block is an error). Held requests
stay queued (their TTL still applies). Active with flow control on and ``flowControl.usageLimitPolicyPluginRef``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import PluginContext, check_keys, register


@register
class SoftReflectiveCeilingPolicy:
    type_name: ClassVar[str] = "soft-reflective-ceiling-policy"
    __slots__ = ("name", "tick")

    def __init__(self, name: str = "soft-reflective-ceiling-policy") -> None:
        self.name = name
        self.tick = 0

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "SoftReflectiveCeilingPolicy":
        check_keys(params, ())
        return cls(name)

    def compute_limits(self, saturation: float, bands: int) -> list[float]:
        if bands <= 0:
            return []
        if bands == 1:
            return [1.0]
        s = saturation
        is_open = False
        if 1.0 - s <= s < 1.0:
            period = max(1, round(s / (1.0 - s + 1e-9)))
            self.tick += 1
            is_open = self.tick % period == 0
        out = [1.0]
        for i in range(1, bands):
            reflective = 1.0 - i * s / (bands - 1)
            if s < reflective:
                out.append(1.0)
            elif s >= 1.0:
                out.append(0.0)
            else:
                out.append(1.0 if is_open else 0.0)
        return out
