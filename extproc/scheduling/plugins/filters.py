"""Filters that every profile runs first (``config.py`` prepends them implicitly).

- ``healthy-filter``: keeps endpoints that are healthy (scrapes succeed) and not removed from the pool.
- ``model-filter``: keeps endpoints whose served models (base models and LoRA adapters, as listed by
  ``/v1/models``) contain the request's target model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_bool, register


@register
class HealthyFilter:
    """Drops unhealthy and removed endpoints."""

    type_name: ClassVar[str] = "healthy-filter"
    __slots__ = ("name",)

    def __init__(self, name: str = "healthy-filter") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "HealthyFilter":
        check_keys(params, ())
        return cls(name)

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        return [e for e in candidates if e.healthy and not e.removed]


@register
class ModelFilter:
    """Keeps endpoints that serve ``request.target_model`` (LoRA adapters are listed as models too).

    ``allowUnknown: true`` also keeps endpoints whose model list has not been discovered yet (empty set);
    by default they are dropped so a request never lands on a pod that would answer 404.
    """

    type_name: ClassVar[str] = "model-filter"
    __slots__ = ("name", "allow_unknown")

    def __init__(self, name: str = "model-filter", allow_unknown: bool = False) -> None:
        self.name = name
        self.allow_unknown = allow_unknown

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ModelFilter":
        check_keys(params, ("allowUnknown",))
        return cls(name, get_bool(params, "allowUnknown", False))

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        model = request.target_model
        if self.allow_unknown:
            return [e for e in candidates if not e.models or model in e.models]
        return [e for e in candidates if model in e.models]
