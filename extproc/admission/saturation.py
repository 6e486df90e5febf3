"""Saturation detection from fresh metrics plus our own in-flight accounting.

A pod is saturated when its *fresh* metrics say waiting ≥ ``queue_depth_threshold`` or KV use ≥
``kv_cache_util_threshold``, or when our own in-flight count for it is ≥ ``max_inflight_per_pod`` (if set).
Stale metrics (older than ``metrics_staleness_s``) are *unknown*, not saturated: the pod is judged only by our
in-flight accounting. This avoids the reference's false "all saturated" when the staleness bound is shorter
than a scrape period. The fleet is saturated when every healthy candidate is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.datalayer.endpoint import Endpoint


@dataclass(slots=True)
class SaturationDetector:
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_s: float = 2.0
    max_inflight_per_pod: int = 0  # 0 = no own-accounting limit

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> "SaturationDetector":
        def num(key: str, default: float) -> float:
            v = raw.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"saturationDetector.{key} must be a number >= 0, got {v!r}")
            return float(v)

        return cls(
            queue_depth_threshold=int(num("queueDepthThreshold", 5)),
            kv_cache_util_threshold=num("kvCacheUtilThreshold", 0.8),
            metrics_staleness_s=num("metricsStalenessThresholdSeconds", 2.0),
            max_inflight_per_pod=int(num("maxInflightPerPod", 0)),
        )

    def pod_saturated(self, ep: Endpoint, now: float) -> bool:
        if self.max_inflight_per_pod and ep.inflight >= self.max_inflight_per_pod:
            return True
        m = ep.metrics
        if m.updated_at == 0.0 or now - m.updated_at > self.metrics_staleness_s:
            return False  # stale ≠ saturated
        return m.waiting >= self.queue_depth_threshold or m.kv_usage >= self.kv_cache_util_threshold

    def saturated(self, candidates: Sequence[Endpoint], now: float | None = None) -> bool:
        now = now if now is not None else time.monotonic()
        any_healthy = False
        for ep in candidates:
            if not ep.healthy or ep.removed:
                continue
            any_healthy = True
            if not self.pod_saturated(ep, now):
                return False
        return any_healthy

    def headroom(self, candidates: Sequence[Endpoint], now: float | None = None) -> int | None:
        """Free slots for sheddable requests over the healthy candidates: Σ max(0, ``max_inflight_per_pod`` −
        in flight), a pod saturated by fresh metrics counting 0. ``None`` without an in-flight limit (no slot
        count to report). One pass over the pods, no allocation: cheap enough for every batch request."""
        cap = self.max_inflight_per_pod
        if not cap:
            return None
        now = now if now is not None else time.monotonic()
        free = 0
        for ep in candidates:
            if not ep.healthy or ep.removed or ep.inflight >= cap:
                continue
            m = ep.metrics
            if m.updated_at != 0.0 and now - m.updated_at <= self.metrics_staleness_s and (
                m.waiting >= self.queue_depth_threshold or m.kv_usage >= self.kv_cache_util_threshold
            ):
                continue
            free += cap - ep.inflight
        return free

    def level(self, candidates: Sequence[Endpoint], now: float | None = None) -> float:
        """Pool saturation as a number (the reference's utilization-detector roofline): mean over healthy pods with
        fresh metrics of max(waiting / queue threshold, KV use / KV threshold); 1.0 means at the thresholds. Pods
        with stale metrics are left out (unknown, as above); none fresh → 0."""
        now = now if now is not None else time.monotonic()
        total = 0.0
        n = 0
        qd = float(self.queue_depth_threshold) or 1.0
        kv = self.kv_cache_util_threshold or 1.0
        for ep in candidates:
            if not ep.healthy or ep.removed:
                continue
            m = ep.metrics
            if m.updated_at == 0.0 or now - m.updated_at > self.metrics_staleness_s:
                continue
            total += max(m.waiting / qd, m.kv_usage / kv)
            n += 1
        return total / n if n else 0.0
