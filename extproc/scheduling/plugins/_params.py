"""Strict parameter readers shared by the built-in plugins.

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
