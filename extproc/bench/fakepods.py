"""Fake vLLM pods that cost (almost) nothing: one Envoy process, one listener per pod, every answer a
``direct_response``.

``extproc bench overhead`` needs an upstream that is not the thing being measured. The Python simulator spends
hundreds of microseconds of CPU per request on a 2-core machine, which hides the proxy and the scheduler; an
Envoy ``direct_response`` costs a few microseconds. Each listener (127.0.0.1:PORT, a free port) answers:

- ``POST /v1/completions`` → 200 + a fixed OpenAI text completion with ``usage`` (``/v1/chat/completions``: a
  fixed chat completion);
- ``GET /metrics`` → a fixed vLLM metrics text with every family the scraper reads
  (:data:`extproc.datalayer.scrape.METRIC_NAMES`), values varied per pod so scoring has work to do;
- ``GET /v1/models`` → the model list; ``GET /health`` → 200; anything else → 404;

and every response carries ``x-inference-pod: 127.0.0.1:PORT`` (the same header the simulator sets, filled in by
Envoy from ``%DOWNSTREAM_LOCAL_ADDRESS%``), so a client can check which pod answered.

Every listener binds port 0 and the ports are read back from Envoy's admin ``/listeners`` (no free-port guessing,
so 512 pods start as reliably as 8; picking free ports first raced other processes and collided at 256).

```python
async with FakePods(8) as pods:
    pods.endpoints      # ["127.0.0.1:40001", ...]
    pods.envoy.pid      # for CPU accounting
```
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from extproc.datalayer.scrape import M_CACHE_CONFIG, M_KV, M_LORA, M_PREFIX_HITS, M_PREFIX_QUERIES, M_RUNNING, M_WAITING
from extproc.envoy_runner import EnvoyProcess

log = logging.getLogger(__name__)

__all__ = ["FakePodMetrics", "FakePods", "bootstrap", "completion_body", "metrics_text", "pod_metrics"]

POD_HEADER = "x-inference-pod"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


@dataclass(slots=True, frozen=True)
class FakePodMetrics:
    """What one fake pod reports on ``/metrics``."""

    waiting: int
    running: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_lora: int = 4


def pod_metrics(index: int) -> FakePodMetrics:
    """Deterministic, distinct load per pod (so queue / KV scorers rank the pods differently)."""
    return FakePodMetrics(
        waiting=(index * 3) % 7,
        running=4 + (index * 5) % 23,
        kv_usage=round(0.05 + ((index * 37) % 90) / 100.0, 2),
        prefix_queries=10_000 + 1_000 * index,
        prefix_hits=2_000 + 300 * index,
    )


def metrics_text(model: str, m: FakePodMetrics) -> str:
    """A vLLM-shaped Prometheus text exposition with the families the scraper reads."""
    lbl = f'engine="0",model_name="{model}"'
    return (
        f"# HELP {M_WAITING} Number of requests waiting to be processed.\n"
        f"# TYPE {M_WAITING} gauge\n"
        f"{M_WAITING}{{{lbl}}} {float(m.waiting)}\n"
        f"# HELP {M_RUNNING} Number of requests in model execution batches.\n"
        f"# TYPE {M_RUNNING} gauge\n"
        f"{M_RUNNING}{{{lbl}}} {float(m.running)}\n"
        f"# HELP {M_KV} KV-cache usage. 1 means 100 percent usage.\n"
        f"# TYPE {M_KV} gauge\n"
        f"{M_KV}{{{lbl}}} {m.kv_usage}\n"
        f"# HELP {M_LORA} Running stats on lora requests.\n"
        f"# TYPE {M_LORA} gauge\n"
        f'{M_LORA}{{max_lora="{m.max_lora}",running_lora_adapters="",waiting_lora_adapters=""}} 1.7e9\n'
        f"# HELP {M_CACHE_CONFIG} Information of the LLMEngine CacheConfig\n"
        f"# TYPE {M_CACHE_CONFIG} gauge\n"
        f'{M_CACHE_CONFIG}{{block_size="{m.block_size}",num_gpu_blocks="{m.num_gpu_blocks}",engine="0"}} 1.0\n'
        f"# HELP {M_PREFIX_QUERIES}_total Prefix cache queries, in terms of number of queried tokens.\n"
        f"# TYPE {M_PREFIX_QUERIES}_total counter\n"
        f"{M_PREFIX_QUERIES}_total{{{lbl}}} {float(m.prefix_queries)}\n"
        f"# HELP {M_PREFIX_HITS}_total Prefix cache hits, in terms of number of cached tokens.\n"
        f"# TYPE {M_PREFIX_HITS}_total counter\n"
        f"{M_PREFIX_HITS}_total{{{lbl}}} {float(m.prefix_hits)}\n"
    )


def completion_body(model: str, chat: bool = False) -> str:
    """A fixed, non-streamed OpenAI completion (one output token) with ``usage``."""
    usage = {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": " ok"}, "finish_reason": "length"}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}
        obj = "text_completion"
    return json.dumps(
        {"id": "cmpl-fake", "object": obj, "created": 0, "model": model, "choices": [choice], "usage": usage},
        separators=(",", ":"),
    )


def _models_body(models: list[str]) -> str:
    return json.dumps(
        {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fakepods", "root": m} for m in models]},
        separators=(",", ":"),
    )


def _route(path: str, method: str | None, status: int, body: str | None, content_type: str | None) -> dict[str, Any]:
    match: dict[str, Any] = {"path": path}
    if method is not None:
        match["headers"] = [{"name": ":method", "string_match": {"exact": method}}]
    route: dict[str, Any] = {"match": match, "direct_response": {"status": status}}
    if body is not None:
        route["direct_response"]["body"] = {"inline_string": body}
    if content_type is not None:
        route["response_headers_to_add"] = [
            {"header": {"key": "content-type", "value": content_type}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
    return route


def _listener(index: int, port: int, models: list[str]) -> dict[str, Any]:
    """One pod listener; ``port`` 0 lets the kernel choose (the pod header then comes from Envoy's local address)."""
    model = models[0]
    j = "application/json"
    routes = [
        _route("/v1/completions", "POST", 200, completion_body(model), j),
        _route("/v1/chat/completions", "POST", 200, completion_body(model, chat=True), j),
        _route("/metrics", "GET", 200, metrics_text(model, pod_metrics(index)), "text/plain; version=0.0.4; charset=utf-8"),
        _route("/v1/models", "GET", 200, _models_body(models), j),
        _route("/health", "GET", 200, None, None),
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": '{"error":"not found"}'}}},
    ]
    hcm = {
        "@type": _HCM,
        "stat_prefix": f"pod{index}",
        "codec_type": "AUTO",
        "route_config": {
            "name": f"pod{index}",
            "virtual_hosts": [
                {
                    "name": f"pod{index}",
                    "domains": ["*"],
                    "routes": routes,
                    "response_headers_to_add": [
                        {"header": {"key": POD_HEADER, "value": f"127.0.0.1:{port}" if port else "%DOWNSTREAM_LOCAL_ADDRESS%"},
                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    ],
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": f"pod{index}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def bootstrap(ports: list[int], models: list[str]) -> dict[str, Any]:
    """Envoy bootstrap (plain dict: a test fixture, not production config) with one direct-response listener per port
    (0 = any free port)."""
    if not models:
        raise ValueError("at least one model")
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [_listener(i, p, models) for i, p in enumerate(ports)]},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {"overload.global_downstream_max_connections": 100000}}]},
    }


class FakePods:
    """``pods`` fake vLLM pods served by one Envoy (``--concurrency 1``). Use ``async with`` or start()/stop()."""

    def __init__(self, pods: int = 8, models: list[str] | None = None, concurrency: int = 1) -> None:
        if pods < 1:
            raise ValueError("pods must be >= 1")
        self.pods = pods
        self.models = list(models or ["sim-llama"])
        self.concurrency = concurrency
        self.envoy: EnvoyProcess | None = None
        self.endpoints: list[str] = []

    async def start(self) -> Self:
        # Every listener binds port 0: Envoy (the kernel) picks free ports atomically and we read them back by
        # listener name from admin /listeners, so nothing can take a port between choosing and binding it.
        self.envoy = await EnvoyProcess.start(bootstrap([0] * self.pods, self.models), concurrency=self.concurrency)
        ports = self.envoy.listener_ports
        try:
            self.endpoints = [f"127.0.0.1:{ports[f'pod{i}']}" for i in range(self.pods)]
        except KeyError as e:
            await self.stop()
            raise RuntimeError(f"fake pods: Envoy did not report listener {e} (got {len(ports)} of {self.pods})") from None
        return self

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
