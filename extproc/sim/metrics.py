"""``/metrics`` of a simulated pod with vLLM 0.32's names, types and labels.

One ``CollectorRegistry`` per pod holds one custom collector that reads the engine's gauges and counters at
scrape time and keeps its own histogram bucket counts (a ``bisect`` and two additions per observation, cheaper
than prometheus_client's locked Histogram on the token hot path). Labels follow vLLM V1's
``PrometheusStatLogger`` (vllm/v1/metrics/loggers.py): ``model_name`` and ``engine="0"``; bucket bounds are
vLLM's. Every value comes from the engine; nothing is invented.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from extproc.sim.engine import Engine, StepResult

__all__ = ["PodMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
_REQ_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
_TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
_FINISH_REASONS = ("stop", "length", "abort", "error")
# vLLM's NixlConnector metrics (vllm/distributed/kv_transfer/kv_connector/v1/nixl/stats.py)
_NIXL_XFER_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_NIXL_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))


class _Hist:
    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.total += v
        self.n += 1

    def family(self, name: str, doc: str, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labels)
        acc = 0
        buckets: list[tuple[str, float]] = []
        for b, c in zip(self.bounds, self.counts):
            acc += c
            buckets.append((repr(float(b)), acc))
        buckets.append(("+Inf", self.n))
        fam.add_metric(values, buckets, self.total)
        return fam


class PodMetrics(Collector):
    """Per-pod collector; ``observe(step_result)`` after each engine step, ``render()`` for ``/metrics``."""

    def __init__(
        self, engine: Engine, model_name: str, *, lora_enabled: bool, max_loras: int, kv_connector: bool = False
    ) -> None:
        self.engine = engine
        self.kv_connector = kv_connector
        self.nixl_xfer = _Hist(_NIXL_XFER_BUCKETS)
        self.nixl_bytes = _Hist(_NIXL_BYTES_BUCKETS)
        self.nixl_failed = 0
        self.model_name = model_name
        self.lora_enabled = lora_enabled
        self.max_loras = max_loras
        self.ttft = _Hist(_TTFT_BUCKETS)
        self.itl = _Hist(_ITL_BUCKETS)
        self.e2e = _Hist(_REQ_BUCKETS)
        self.queue = _Hist(_REQ_BUCKETS)
        self.prefill = _Hist(_REQ_BUCKETS)
        self.decode = _Hist(_REQ_BUCKETS)
        self.tpot = _Hist(_TPOT_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine

    def observe(self, res: StepResult) -> None:
        obs = self.ttft.observe
        for v in res.ttft_s:
            obs(v)
        obs = self.itl.observe
        for v in res.itl_s:
            obs(v)
        for secs, nbytes in res.kv_loads:
            self.nixl_xfer.observe(secs)
            self.nixl_bytes.observe(nbytes)
        self.nixl_failed += res.kv_load_failures
        for f in res.finished:
            self.e2e.observe(f.finished - f.arrival)
            self.queue.observe(max(0.0, f.scheduled - f.arrival))
            self.prefill.observe(max(0.0, f.first_token - f.scheduled))
            self.decode.observe(max(0.0, f.finished - f.first_token))
            if f.num_output_tokens > 1:
                self.tpot.observe((f.finished - f.first_token) / (f.num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        eng = self.engine
        st = eng.stats
        labels = ["model_name", "engine"]
        values = [self.model_name, "0"]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, v)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", eng.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", eng.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            st.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", st.prefix_cache_hits
        )
        yield counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local prefix cache hits).",
            st.prompt_tokens_cached_total,
        )
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", st.num_preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens_total)
        succ = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*labels, "finished_reason"]
        )
        for reason in _FINISH_REASONS:
            succ.add_metric([*values, reason], st.finished_reasons.get(reason, 0))
        yield succ

        prof = eng.profile
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
                "num_cpu_blocks", "num_gpu_blocks", "num_gpu_blocks_override", "engine",
            ],
        )
        cache.add_metric(
            [
                str(prof.block_size), "auto", str(eng.kv.enable_prefix_caching), "0.9", "None",
                str(prof.num_gpu_blocks), "None", "0",
            ],
            1.0,
        )
        yield cache

        if self.lora_enabled:
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            lora.add_metric(
                [str(self.max_loras), ",".join(eng.waiting_loras), ",".join(eng.running_loras)], time.time()
            )
            yield lora

        if self.kv_connector:
            yield self.nixl_xfer.family(
                "vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", labels, values
            )
            yield self.nixl_bytes.family(
                "vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", labels, values
            )
            yield counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.", self.nixl_failed)

        yield self.ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, values
        )
        yield self.itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels, values
        )
        yield self.e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels, values
        )
        yield self.queue.family(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", labels, values
        )
        yield self.prefill.family(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", labels, values
        )
        yield self.decode.family(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", labels, values
        )
        yield self.tpot.family(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            labels,
            values,
        )
