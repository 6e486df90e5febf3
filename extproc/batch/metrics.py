"""Prometheus metrics of the batch service (its own registry, served on ``/metrics``).

* ``extproc_batch_jobs{status}``: jobs by status (from the store, refreshed by the worker each tick)
* ``extproc_batch_lines_total{result="completed|failed"}``: lines this replica finished
* ``extproc_batch_dispatch_concurrency``: the AIMD limit; ``extproc_batch_dispatch_inflight``: lines on the wire
* ``extproc_batch_dispatch_backoffs_total``: multiplicative decreases; ``..._saturation_holds_total``; ``extproc_batch_dispatch_responses_total{code}``
* ``extproc_batch_queue_age_seconds``: age of the oldest line not yet finished (0 when none)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.batch.model import STATUSES

if TYPE_CHECKING:
    from extproc.batch.store import Store


class _Collector(Collector):
    def __init__(self, owner: "BatchMetrics") -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        o = self.owner
        jobs = GaugeMetricFamily("extproc_batch_jobs", "Batch jobs by status", labels=["status"])
        for s in STATUSES:
            jobs.add_metric([s], float(o.jobs.get(s, 0)))
        yield jobs
        svc = o.service
        d = getattr(svc, "dispatcher", None)
        yield GaugeMetricFamily("extproc_batch_dispatch_concurrency", "AIMD concurrency limit of this replica", value=float(d.aimd.limit) if d else 0.0)
        yield GaugeMetricFamily("extproc_batch_dispatch_inflight", "Batch lines on the wire to the gateway", value=float(d.aimd.inflight) if d else 0.0)
        yield GaugeMetricFamily("extproc_batch_held_lines", "Lines this replica holds (sending or waiting to retry)", value=float(len(getattr(svc, "_tasks", {}))))
        yield CounterMetricFamily("extproc_batch_dispatch_backoffs", "Multiplicative decreases of the concurrency limit (429 other than saturated, 503)", value=float(d.aimd.decreases) if d else 0.0)
        yield CounterMetricFamily("extproc_batch_dispatch_saturation_races", "Saturated sheds right after a completion (the limit kept)", value=float(d.aimd.races) if d else 0.0)
        yield CounterMetricFamily("extproc_batch_dispatch_headroom_updates", "Times the limit was set from the gateway's x-gateway-batch-headroom answer", value=float(d.aimd.headroom_updates) if d else 0.0)
        yield CounterMetricFamily("extproc_batch_dispatch_saturation_holds", "Times the limit was held at the in-flight level on the gateway's saturated shed", value=float(d.aimd.holds) if d else 0.0)
        resp = CounterMetricFamily("extproc_batch_dispatch_responses", "Gateway answers by status code", labels=["code"])
        for k, v in (d.responses.items() if d else ()):
            resp.add_metric([k], float(v))
        yield resp
        yield GaugeMetricFamily("extproc_batch_queue_age_seconds", "Age of the oldest unfinished line", value=(time.time() - o.oldest) if o.oldest else 0.0)


class BatchMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.lines = Counter("extproc_batch_lines", "Batch lines finished by this replica", ["result"], registry=self.registry)
        self.finished = Counter("extproc_batch_jobs_finished", "Jobs this replica brought to a terminal status", ["status"], registry=self.registry)
        self.jobs: dict[str, int] = {}
        self.oldest: float | None = None
        self.service: Any = None
        self.registry.register(_Collector(self))

    def bind(self, service: Any) -> None:
        self.service = service

    async def refresh(self, store: "Store") -> None:
        self.jobs = await store.status_counts()
        self.oldest = await store.oldest_pending_created()

    def line_done(self, ok: bool) -> None:
        self.lines.labels("completed" if ok else "failed").inc()

    def job_finished(self, status: str) -> None:
        self.finished.labels(status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
