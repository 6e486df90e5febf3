"""Pareto front and ranking over (cost per hour: lower is better, SLO attainment: higher is better)."""

from __future__ import annotations

from collections.abc import Sequence

def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(cost, attainment) ``a`` dominates ``b``: no worse in both, strictly better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, in input order. Equal points are all on the front."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -float("inf")  # highest attainment seen at a strictly lower cost, or at this cost earlier in the sweep
    i = 0
    while i < len(order):
        # one cost level at a time: within it, only the highest attainment survives (ties: all of them)
        j = i
        c = points[order[i]][0]
        while j < len(order) and points[order[j]][0] == c:
            j += 1
        level = order[i:j]
        top = max(points[k][1] for k in level)
        if top > best:
            front += [k for k in level if points[k][1] == top]
            best = top
        i = j
    return sorted(front)


def rank_key(slo_met: bool, cost: float, attainment: float, violation: float, order: int) -> tuple[int, float, float, float, int]:
    """Ranking: candidates meeting every SLO first, cheapest first, then the highest attainment, then the smallest
    worst-case excess over a target (the most headroom), then evaluation order (a deterministic tie-break)."""
    return (0 if slo_met else 1, cost if slo_met else 0.0, -attainment, violation, order)
