"""Topology affinity to the pod picked by an earlier profile of the same cycle (``PEER_ENDPOINT``, published by a
P/D handler before the second stage runs).

Reference: llm-d-router pkg/epp/framework/plugins/{datalayer/extractor/topology, scheduling/filter/topologyaffinity,
scheduling/scorer/topologyaffinity}. Topology is read from pod labels (Kubernetes discovery, or the endpoints file
for static endpoints):

- ``topology-extractor``: which labels name host, rack, zone and region (``hostname`` default
  ``kubernetes.io/hostname``, ``rack`` ``topology.kubernetes.io/rack``, ``zone`` ``topology.kubernetes.io/zone``,
  ``region`` ``topology.kubernetes.io/region``). It has no scheduling role; the filter and scorer use its labels.
- ``topology-affinity-filter``: keeps candidates sharing at least ``minAffinity`` (host | rack | zone | region,
  default host) with the peer; no peer topology, or no candidate close enough → all candidates (fail open).
- ``topology-affinity-scorer``: host 1.0, rack 0.2, zone 0.05, region 0.02, none 0 (the reference's fixed curve);
  every candidate 0 without peer topology.

The tightest common level wins (same host implies same rack, zone and region); a missing value never matches,
not even empty against empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    PEER_ENDPOINT,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    check_keys,
    get_choice,
    get_str,
    register,
)

LEVELS = ("host", "rack", "zone", "region")
LEVEL_SCORES = {"host": 1.0, "rack": 0.2, "zone": 0.05, "region": 0.02}
DEFAULT_LABELS = {
    "host": "kubernetes.io/hostname",
    "rack": "topology.kubernetes.io/rack",
    "zone": "topology.kubernetes.io/zone",
    "region": "topology.kubernetes.io/region",
}
SERVICE_KEY = "topology_labels"


def common_level(a: Mapping[str, str], b: Mapping[str, str], labels: Mapping[str, str]) -> str | None:
    """Tightest level two label sets share (``None`` when none)."""
    for level in LEVELS:
        key = labels[level]
        va, vb = a.get(key), b.get(key)
        if va and vb and va == vb:
            return level
    return None


@register
class TopologyExtractor:
    type_name: ClassVar[str] = "topology-extractor"
    __slots__ = ("name", "labels")

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name = name
        self.labels = labels

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "TopologyExtractor":
        check_keys(params, ("hostname", "rack", "zone", "region"))
        labels = {
            "host": get_str(params, "hostname", DEFAULT_LABELS["host"]),
            "rack": get_str(params, "rack", DEFAULT_LABELS["rack"]),
            "zone": get_str(params, "zone", DEFAULT_LABELS["zone"]),
            "region": get_str(params, "region", DEFAULT_LABELS["region"]),
        }
        ctx.services.setdefault(SERVICE_KEY, labels)
        return cls(name, labels)


class _Topology:
    __slots__ = ("name", "_services")

    def __init__(self, name: str, services: dict[str, Any] | None = None) -> None:
        self.name = name
        self._services = services if services is not None else {}

    def _labels(self) -> Mapping[str, str]:
        return self._services.get(SERVICE_KEY) or DEFAULT_LABELS

    def _peer(self, cycle: CycleState) -> Endpoint | None:
        peer = cycle.get(PEER_ENDPOINT)
        if peer is None:
            return None
        labels = self._labels()
        return peer if any(peer.labels.get(labels[lv]) for lv in LEVELS) else None


@register
class TopologyAffinityFilter(_Topology):
    type_name: ClassVar[str] = "topology-affinity-filter"
    __slots__ = ("min_level",)

    def __init__(self, name: str = "topology-affinity-filter", min_level: str = "host", services: dict[str, Any] | None = None) -> None:
        super().__init__(name, services)
        self.min_level = min_level

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "TopologyAffinityFilter":
        check_keys(params, ("minAffinity", "topologyProducerName"))
        if "topologyProducerName" in params:
            get_str(params, "topologyProducerName", "x")
        return cls(name, get_choice(params, "minAffinity", "host", LEVELS), ctx.services)

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        peer = self._peer(cycle)
        if peer is None:
            return candidates
        labels = self._labels()
        floor = LEVELS.index(self.min_level)
        kept = []
        for e in candidates:
            lv = common_level(e.labels, peer.labels, labels)
            if lv is not None and LEVELS.index(lv) <= floor:
                kept.append(e)
        return kept or candidates


@register
class TopologyAffinityScorer(_Topology):
    type_name: ClassVar[str] = "topology-affinity-scorer"
    __slots__ = ()

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "TopologyAffinityScorer":
        check_keys(params, ("topologyProducerName",))
        return cls(name, ctx.services)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        peer = self._peer(cycle)
        if peer is None:
            return [0.0] * len(candidates)
        labels = self._labels()
        out = []
        for e in candidates:
            lv = common_level(e.labels, peer.labels, labels)
            out.append(LEVEL_SCORES[lv] if lv is not None else 0.0)
        return out
