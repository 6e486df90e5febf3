"""Endpoints (model-server pods) and their live state.

Hot-path records: plain slotted classes. The scraper replaces ``Endpoint.metrics`` with a fresh immutable
``PodMetrics`` snapshot on every scrape (one attribute store, so readers never see a half-written state);
in-flight counters are owned by the event loop thread and changed only there.

One owner per field. Everything reads an ``Endpoint``; each group of its fields has one writer, which changes
it only through the group's methods (so a grep for the method finds every write):

=====================================================  ========================================  ==========================================
fields                                                 owner                                     writer methods
=====================================================  ========================================  ==========================================
``metrics``, ``models``                                the scraper (``datalayer.scrape``)        ``set_metrics``, ``set_models``
``healthy``, ``scrape_failures``, ``last_error``       the scraper's health logic                ``scrape_ok``, ``scrape_failed``; the
                                                                                                 response side (handler, access log) only
                                                                                                 adds evidence: ``note_upstream_failure``
``inflight``, ``inflight_prefill_tokens``,             the flight tracker (``server.tracker``)   ``add_inflight``, ``prefill_done``,
``inflight_decode_tokens``, ``inflight_batch``                                                   ``release_inflight``
``last_chunk_ts``, ``chunk_interval_s``                ``predictor.features.observe_chunk``      ``set_chunk_timing``
``labels``, ``pod_class``, ``removed``                 ``EndpointPool`` (membership)             ``EndpointPool.set_endpoints``
=====================================================  ========================================  ==========================================

Simulations that stand in for an owner (the virtual benchmark's scrape, the training-data generator's
accounting) call the same methods. Tests may set fields directly to build a state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class PodMetrics:
    """One scrape of a vLLM pod's ``/metrics`` (vLLM 0.32 names)."""

    waiting: int = 0  # vllm:num_requests_waiting
    running: int = 0  # vllm:num_requests_running
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc (0..1)
    running_loras: frozenset[str] = frozenset()  # vllm:lora_requests_info{running_lora_adapters}
    waiting_loras: frozenset[str] = frozenset()  # vllm:lora_requests_info{waiting_lora_adapters}
    max_loras: int = 0  # vllm:lora_requests_info{max_lora}
    block_size: int = 0  # vllm:cache_config_info{block_size}
    num_gpu_blocks: int = 0  # vllm:cache_config_info{num_gpu_blocks}
    prefix_cache_queries: float = 0.0  # vllm:prefix_cache_queries_total
    prefix_cache_hits: float = 0.0  # vllm:prefix_cache_hits_total
    updated_at: float = 0.0  # time.monotonic() when scraped; 0 = never


ACCELERATOR_LABEL = "accelerator"


def pod_class_of(labels: dict[str, str]) -> str:
    """The class a pod is learned under: an explicit ``pod-class`` label, else the hardware the pod exposes
    (``accelerator``, e.g. from the node's ``nvidia.com/gpu.product`` / ``amd.com/gpu.product-name`` label),
    else ``default``. Never a simulator profile name: the latency predictor keys on what a real pod exposes."""
    return labels.get("pod-class") or labels.get(ACCELERATOR_LABEL) or "default"


class Endpoint:
    """A model-server pod as the scheduler sees it."""

    __slots__ = (
        "address",
        "host",
        "port",
        "labels",
        "pod_class",
        "metrics",
        "models",
        "healthy",
        "scrape_failures",
        "last_error",
        "inflight",
        "inflight_prefill_tokens",
        "inflight_decode_tokens",
        "inflight_batch",
        "removed",
        "last_chunk_ts",
        "chunk_interval_s",
    )

    def __init__(self, address: str, labels: dict[str, str] | None = None, models: Iterable[str] = ()) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint must be host:port, got {address!r}")
        self.address = address
        self.host = host
        self.port = int(port)
        self.labels: dict[str, str] = dict(labels or {})
        self.pod_class: str = pod_class_of(self.labels)
        self.metrics = PodMetrics()
        # Models (base and LoRA adapters) served, from /v1/models; empty until first discovered.
        self.models: frozenset[str] = frozenset(models)
        self.healthy = True  # flips to False after repeated scrape failures; recovers on success
        self.scrape_failures = 0
        self.last_error = ""
        self.inflight = 0  # requests we dispatched and have not seen finish
        self.inflight_prefill_tokens = 0  # prompt tokens of in-flight requests not yet past first token
        self.inflight_decode_tokens = 0  # max_tokens of in-flight requests in decode
        # of ``inflight``, the batch band's (sheddable, priority < 0): scheduling.reservation keeps pods free of them
        self.inflight_batch = 0
        self.removed = False
        # time.monotonic() of the last response body chunk seen from this pod (observation stream): a proxy for
        # where the pod is in its current engine step, which the latency predictor uses
        self.last_chunk_ts = 0.0
        # EWMA of the gaps between this pod's engine steps as seen in its chunks (seconds; 0 = not measured yet),
        # kept by extproc.predictor.features.observe_chunk
        self.chunk_interval_s = 0.0

    # ---------------------------------------------------------------- writers (see the module docstring)
    def set_metrics(self, metrics: PodMetrics) -> None:
        """The scraper: a fresh snapshot of the pod's ``/metrics`` (one store; readers see old or new)."""
        self.metrics = metrics

    def set_models(self, models: frozenset[str]) -> None:
        """The scraper: the models (base and LoRA adapters) the pod's ``/v1/models`` lists."""
        self.models = models

    def scrape_ok(self) -> bool:
        """The scraper's health logic: a successful scrape clears the failure count. True if the pod was
        unhealthy and has recovered."""
        recovered = not self.healthy
        self.healthy = True
        self.scrape_failures = 0
        self.last_error = ""
        return recovered

    def scrape_failed(self, error: str, unhealthy_after: int) -> bool:
        """The scraper's health logic: one more failed scrape; the pod turns unhealthy at ``unhealthy_after``
        consecutive failures. True if this failure made it unhealthy."""
        self.scrape_failures += 1
        self.last_error = error[:200]
        if self.healthy and self.scrape_failures >= unhealthy_after:
            self.healthy = False
            return True
        return False

    def note_upstream_failure(self) -> None:
        """The response side (handler, access log): an upstream 5xx or connection failure counts toward the
        health logic's failure count like a failed scrape (the next successful scrape clears it)."""
        self.scrape_failures += 1

    def add_inflight(self, prompt_tokens: int, batch: bool = False) -> None:
        """The flight tracker: a request was dispatched here and is in prefill (``batch``: a sheddable one)."""
        self.inflight += 1
        self.inflight_prefill_tokens += prompt_tokens
        if batch:
            self.inflight_batch += 1

    def prefill_done(self, prompt_tokens: int, decode_tokens: int) -> None:
        """The flight tracker: a request here produced its first token (prefill → decode)."""
        self.inflight_prefill_tokens -= prompt_tokens
        self.inflight_decode_tokens += decode_tokens

    def release_inflight(self, prefill_tokens: int = 0, decode_tokens: int = 0, batch: bool = False) -> None:
        """The flight tracker: a request here ended (or its prefill leg did), with the tokens it still held in
        the prefill or the decode phase (``batch``: it was counted by ``add_inflight(..., batch=True)``)."""
        self.inflight -= 1
        if batch:
            self.inflight_batch -= 1
        self.inflight_prefill_tokens -= prefill_tokens
        self.inflight_decode_tokens -= decode_tokens

    def add_peer_load(self, inflight: int, prefill_tokens: int, decode_tokens: int) -> None:
        """The replication layer (``server/replication.py``): other scheduler replicas' in-flight load on this pod
        changed by these amounts (so every reader of the counters sees the fleet-wide total)."""
        self.inflight += inflight
        self.inflight_prefill_tokens += prefill_tokens
        self.inflight_decode_tokens += decode_tokens

    def set_chunk_timing(self, last_chunk_ts: float, chunk_interval_s: float) -> None:
        """``predictor.features.observe_chunk``: the last response chunk's time and the step-interval EWMA."""
        self.last_chunk_ts = last_chunk_ts
        self.chunk_interval_s = chunk_interval_s

    def metrics_age(self, now: float | None = None) -> float:
        if self.metrics.updated_at == 0.0:
            return float("inf")
        return (now if now is not None else time.monotonic()) - self.metrics.updated_at

    def serves(self, model: str) -> bool:
        return model in self.models

    def __repr__(self) -> str:
        return f"Endpoint({self.address!r}, healthy={self.healthy}, inflight={self.inflight})"


EndpointListener = Callable[[list["Endpoint"], list["Endpoint"]], None]  # (added, removed)


@dataclass(slots=True)
class EndpointPool:
    """The registry of known endpoints. Discovery sources (static list, Kubernetes) call ``set_endpoints``.

    ``snapshot()`` returns a tuple rebuilt only when membership changes, so the hot path pays nothing.
    Removal keeps the Endpoint object alive for requests still in flight (they hold a reference) but marks it
    ``removed`` so it is never picked again.
    """

    _by_address: dict[str, Endpoint] = field(default_factory=dict)
    _snapshot: tuple[Endpoint, ...] = ()
    _listeners: list[EndpointListener] = field(default_factory=list)
    default_models: frozenset[str] = frozenset()

    def set_endpoints(self, addresses: Iterable[str], labels: dict[str, dict[str, str]] | None = None) -> None:
        labels = labels or {}
        wanted = list(dict.fromkeys(addresses))
        added: list[Endpoint] = []
        removed: list[Endpoint] = []
        for addr in wanted:
            ep = self._by_address.get(addr)
            if ep is None:
                ep = Endpoint(addr, labels.get(addr), self.default_models)
                self._by_address[addr] = ep
                added.append(ep)
            elif addr in labels:
                ep.labels = dict(labels[addr])
                ep.pod_class = pod_class_of(ep.labels)
        keep = set(wanted)
        for addr in list(self._by_address):
            if addr not in keep:
                ep = self._by_address.pop(addr)
                ep.removed = True
                removed.append(ep)
        if added or removed:
            self._snapshot = tuple(self._by_address.values())
            for listener in list(self._listeners):
                listener(added, removed)

    def add_listener(self, listener: EndpointListener) -> None:
        self._listeners.append(listener)

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def __len__(self) -> int:
        return len(self._by_address)

    def healthy(self) -> list[Endpoint]:
        return [e for e in self._snapshot if e.healthy]

    def served_models(self) -> set[str]:
        """Models served by the healthy fleet (what GET /v1/models answers)."""
        out: set[str] = set()
        for e in self._snapshot:
            if e.healthy:
                out |= e.models
        return out

    def known_models(self) -> set[str]:
        """Models served by any known endpoint, healthy or not (a model outside this set is a 404)."""
        out: set[str] = set(self.default_models)
        for e in self._snapshot:
            out |= e.models
        return out
