"""Strict parameter readers for plugins (public through :mod:`extproc.plugin`).

Every reader raises ``ValueError``/``TypeError`` with a precise reason; ``config.py`` turns that into a
``ConfigError`` naming the file and the plugin. Unknown parameter names are errors too (a typo such as
``maxNumOfEndpoint`` must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_keys(params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed_set = set(allowed)
    unknown = sorted(k for k in params if k not in allowed_set)
    if unknown:
        known = ", ".join(sorted(allowed_set)) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} (accepted: {known})")


def get_int(params: Mapping[str, Any], key: str, default: int, *, minimum: int | None = None) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"parameter '{key}' must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"parameter '{key}' must be >= {minimum}, got {v}")
    return v


def get_float(
    params: Mapping[str, Any], key: str, default: float, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"parameter '{key}' must be a number, got {v!r}")
    f = float(v)
    if f != f:
        raise ValueError(f"parameter '{key}' must not be NaN")
    if minimum is not None and f < minimum:
        raise ValueError(f"parameter '{key}' must be >= {minimum}, got {f}")
    if maximum is not None and f > maximum:
        raise ValueError(f"parameter '{key}' must be <= {maximum}, got {f}")
    return f


def get_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise TypeError(f"parameter '{key}' must be true or false, got {v!r}")
    return v


def get_str(params: Mapping[str, Any], key: str, default: str) -> str:
    v = params.get(key, default)
    if not isinstance(v, str) or not v:
        raise TypeError(f"parameter '{key}' must be a non-empty string, got {v!r}")
    return v


def get_str_list(params: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = params.get(key, [])
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
        raise TypeError(f"parameter '{key}' must be a list of non-empty strings, got {v!r}")
    return tuple(v)


def get_seed(params: Mapping[str, Any], key: str = "seed") -> int | None:
    v = params.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"parameter '{key}' must be an integer, got {v!r}")
    return v


def get_choice(params: Mapping[str, Any], key: str, default: str, choices: Iterable[str]) -> str:
    v = get_str(params, key, default)
    allowed = tuple(choices)
    if v not in allowed:
        raise ValueError(f"parameter '{key}' must be one of {', '.join(allowed)}, got {v!r}")
    return v


def get_mapping(params: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A nested parameter block (``{}`` when absent)."""
    v = params.get(key, {})
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise TypeError(f"parameter '{key}' must be a mapping, got {v!r}")
    return v


_DURATION_UNITS = (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from a Go-style duration (``"150ms"``, ``"1s"``, ``"1m30s"``) or a bare number of seconds."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a duration such as '150ms' or '1s', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{what} must be a duration such as '150ms' or '1s', got {value!r}")
    s = value.strip()
    total = 0.0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and (s[j].isdigit() or s[j] == "."):
            j += 1
        if j == i:
            raise ValueError(f"{what} {value!r} is not a duration such as '150ms' or '1s'")
        num = float(s[i:j])
        for unit, mult in _DURATION_UNITS:
            if s.startswith(unit, j):
                total += num * mult
                i = j + len(unit)
                break
        else:
            raise ValueError(f"{what} {value!r} has no unit (use ms, s, m or h)")
    return total


def get_duration(params: Mapping[str, Any], key: str, default_s: float) -> float:
    """A duration parameter in seconds (accepts ``"150ms"``, ``"1s"`` or a number of seconds)."""
    if key not in params or params[key] is None:
        return default_s
    return parse_duration(params[key], f"parameter '{key}'")
