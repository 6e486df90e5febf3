"""The scheduler's own Prometheus metrics (served on :9090 by default).

A per-server CollectorRegistry (several servers can live in one test process); the endpoint also serves the
process-wide default registry (process/GC collectors and any plugin that registered there).
Per-pod gauges are produced by a custom collector at scrape time from the EndpointPool, so the hot path pays
nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.admission.flow_control import FLOW_CONTROL
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import KV_EVENTS
from extproc.datalayer.kvindex import KV_INDEX
from extproc.predictor.service import SERVICE_KEY as PREDICTOR
from extproc.scheduling.plugins.prefix import SERVICE_KEY as PREFIX_INDEX

# microsecond resolution for decisions
DECISION_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _PoolCollector(Collector):
    def __init__(self, pool: EndpointPool, services: dict[str, Any], scrape_errors: dict[str, int]) -> None:
        self.pool = pool
        self.services = services
        self.scrape_errors = scrape_errors

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        inflight = GaugeMetricFamily("extproc_pod_inflight_requests", "Requests dispatched to the pod and not finished", labels=["endpoint"])
        inflight_tok = GaugeMetricFamily("extproc_pod_inflight_tokens", "Tokens of in-flight requests by phase", labels=["endpoint", "phase"])
        healthy = GaugeMetricFamily("extproc_pod_healthy", "1 if the pod is eligible for routing", labels=["endpoint"])
        age = GaugeMetricFamily("extproc_pod_metrics_age_seconds", "Age of the last successful scrape", labels=["endpoint"])
        waiting = GaugeMetricFamily("extproc_pod_waiting_requests", "vllm:num_requests_waiting as last scraped", labels=["endpoint"])
        running = GaugeMetricFamily("extproc_pod_running_requests", "vllm:num_requests_running as last scraped", labels=["endpoint"])
        kv = GaugeMetricFamily("extproc_pod_kv_cache_usage", "vllm:kv_cache_usage_perc as last scraped", labels=["endpoint"])
        errors = CounterMetricFamily("extproc_scrape_errors", "Failed /metrics scrapes", labels=["endpoint"])
        for ep in self.pool.snapshot():
            a = ep.address
            inflight.add_metric([a], ep.inflight)
            inflight_tok.add_metric([a, "prefill"], ep.inflight_prefill_tokens)
            inflight_tok.add_metric([a, "decode"], ep.inflight_decode_tokens)
            healthy.add_metric([a], 1.0 if ep.healthy else 0.0)
            ag = ep.metrics_age(now)
            age.add_metric([a], ag if ag != float("inf") else -1.0)
            waiting.add_metric([a], ep.metrics.waiting)
            running.add_metric([a], ep.metrics.running)
            kv.add_metric([a], ep.metrics.kv_usage)
            errors.add_metric([a], self.scrape_errors.get(a, 0))
        yield from (inflight, inflight_tok, healthy, age, waiting, running, kv, errors)
        yield GaugeMetricFamily("extproc_endpoints", "Known endpoints", value=len(self.pool))
        idx = self.services.get(PREFIX_INDEX)
        stats = getattr(idx, "stats", None)
        if callable(stats):
            st = stats()
            lookups = float(st.get("lookups", 0) or 0)
            hits = float(st.get("hits", 0) or 0)
            yield GaugeMetricFamily("extproc_prefix_index_hit_ratio", "Share of requests with >=1 matched prefix block", value=hits / lookups if lookups else 0.0)
            yield GaugeMetricFamily("extproc_prefix_index_blocks", "Block hashes held by the approximate prefix index", value=float(st.get("blocks_indexed", 0) or 0))
        for name in (KV_INDEX, KV_EVENTS, PREDICTOR, FLOW_CONTROL):
            svc = self.services.get(name)
            stats = getattr(svc, "stats", None)
            if callable(stats):
                for k, v in stats().items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        yield GaugeMetricFamily(f"extproc_{name}_{k}", f"{name} statistic {k}", value=float(v))


class SchedulerMetrics:
    """All metrics of one scheduler instance."""

    def __init__(self, pool: EndpointPool, services: dict[str, Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("extproc_requests", "Requests handled, by model and HTTP status", ["model", "status"], registry=r)
        self.decisions = Histogram("extproc_scheduling_latency_seconds", "Time to parse and schedule one request", buckets=DECISION_BUCKETS, registry=r)
        self.plugin_latency = Histogram("extproc_plugin_latency_seconds", "Time spent in each plugin per request", ["plugin"], buckets=DECISION_BUCKETS, registry=r)
        self.ttft = Histogram("extproc_request_ttft_seconds", "Time from dispatch to first streamed chunk", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("extproc_request_e2e_seconds", "Time from dispatch to end of response", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("extproc_output_tokens", "Output tokens observed in responses", ["model"], registry=r)
        self.completions = Counter("extproc_request_completions", "Dispatched requests by how they ended", ["outcome"], registry=r)
        self.scrape_errors: dict[str, int] = {}
        self._plugin_children: dict[str, Any] = {}
        r.register(_PoolCollector(pool, services if services is not None else {}, self.scrape_errors))

    def plugin_timer(self, plugin: str, seconds: float) -> None:
        child = self._plugin_children.get(plugin)
        if child is None:
            child = self._plugin_children[plugin] = self.plugin_latency.labels(plugin)
        child.observe(seconds)

    def on_scrape(self, ep: Any, ok: bool, seconds: float) -> None:
        if not ok:
            self.scrape_errors[ep.address] = self.scrape_errors.get(ep.address, 0) + 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)
