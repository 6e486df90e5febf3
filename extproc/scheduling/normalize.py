"""Score normalisers shared by scorers (public through :mod:`extproc.plugin`). Each maps raw per-candidate
values to 0..1 scores in candidate order."""

from __future__ import annotations

from collections.abc import Sequence


def min_max_lower_is_better(values: Sequence[int] | Sequence[float]) -> list[float]:
    """(max − v) / (max − min) per value; all equal (or empty) → 1.0 each (GIE queue-scorer's normalisation)."""
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = float(hi - lo)
    return [(hi - v) / span for v in values]


def min_max_higher_is_better(values: Sequence[int] | Sequence[float]) -> list[float]:
    """(v − min) / (max − min) per value; all equal (or empty) → 1.0 each."""
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = float(hi - lo)
    return [(v - lo) / span for v in values]


def fixed_range_lower_is_better(values: Sequence[float], lo: float, hi: float) -> list[float]:
    """(hi − v) / (hi − lo), clamped to 0..1 (a fixed scale, e.g. utilisation 0..1)."""
    span = hi - lo
    if span <= 0:
        raise ValueError(f"empty range [{lo}, {hi}]")
    return [min(1.0, max(0.0, (hi - v) / span)) for v in values]
