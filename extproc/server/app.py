"""Assembles one scheduler process: endpoint pool + scraper + plugin config + ext_proc gRPC server + gRPC health
+ Prometheus endpoint. ``SchedulerServer`` is what ``extproc serve``, the harness and the tests run."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.admission.flow_control import FLOW_CONTROL, FlowControlConfig, FlowController
from extproc.contract import ResponseObserve, envoy_buffer_limit_bytes
from extproc.admission.saturation import SaturationDetector
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import KV_EVENTS
from extproc.datalayer.scrape import SCRAPER, MetricsScraper, ScrapeSettings
from extproc.datalayer.tokenize import TOKENIZERS
from extproc.observe.metrics import SchedulerMetrics
from extproc.predictor.service import STATE_DIR_KEY, WARM_START_KEY
from extproc.scheduling.config import ConfigError, SchedulerConfig, load_config
from extproc.server.accesslog import ALS_METHOD, AccessLogReceiver
from extproc.server.handler import ExtProcHandler, HandlerSettings, observation_outcome_counter, record_observation
from extproc.server.tracker import FlightTracker
from extproc.services import Services

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


def grpc_message_limit(max_body_bytes: int) -> int:
    """Largest ext_proc message we accept: Envoy's request buffer (2 × the body limit, at least body + 1 MiB)
    plus room for headers and framing."""
    return envoy_buffer_limit_bytes(max_body_bytes) + 1024 * 1024


# defaults of the components' settings, spelled once in their own classes
_SCRAPE = ScrapeSettings()
_HANDLER = HandlerSettings()


@dataclass(slots=True)
class ServeOptions:
    endpoints: list[str] = field(default_factory=list)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    config: str = "default"
    models: list[str] = field(default_factory=list)  # served models assumed before /v1/models answers
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090
    scrape_interval_s: float = _SCRAPE.interval_s
    scrape_timeout_s: float = _SCRAPE.timeout_s
    scrape_adaptive: bool = _SCRAPE.adaptive
    scrape_idle_interval_s: float = _SCRAPE.idle_interval_s
    scrape_budget: float = _SCRAPE.max_scrapes_per_s
    unhealthy_after: int = _SCRAPE.unhealthy_after
    max_body_bytes: int = _HANDLER.max_body_bytes
    max_messages_per_stream: int = _HANDLER.max_messages_per_stream
    response_observe: ResponseObserve = _HANDLER.response_observe
    observe_budget: float = _HANDLER.observe_budget  # observability mode: observed requests per second (< 0: all)
    kv_events: dict[str, Any] = field(default_factory=dict)  # address → {"endpoint", "replay", "topic"}
    # one ZMQ endpoint to bind for every pod's KV events (pods told apart by topic); overrides the config's
    # kvEvents.sharedEndpoint / llm-d's kvEventsConfig.zmqEndpoint
    kv_events_bind: str | None = None
    tokenizers: dict[str, Any] = field(default_factory=dict)  # model → {"kind": "hf"|"sim", "path": ...}
    predictor_state_dir: str | None = None
    predictor_warm_start: str | None = None  # overrides every config's warmStart; "none" = cold
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grpc_max_concurrent_streams: int = 0
    # ext_proc transport: "native" (extproc.server.h2grpc, HTTP/2 parsed on the event loop) or "grpcio" (grpc.aio).
    # TLS always uses grpcio.
    grpc_server: str = "native"
    seed: int | None = None
    conformance: bool = False  # honour GIE's conformance header test-epp-endpoint-selection
    # active-active replicas (server/replication.py): redis://host:port/db shared by every replica of the pool
    shared_state: str | None = None
    replica_id: str = ""  # default: random (the flight-key tag)
    shared_state_namespace: str = "extproc"


class SchedulerServer:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.pool = EndpointPool(default_models=frozenset(opts.models))
        self.services = Services()
        if opts.predictor_state_dir:
            self.services[STATE_DIR_KEY] = opts.predictor_state_dir
        if opts.predictor_warm_start is not None:
            ws = opts.predictor_warm_start
            self.services[WARM_START_KEY] = "" if ws.lower() in ("", "none") else ws
        self.metrics = SchedulerMetrics(self.pool, self.services)
        self.config: SchedulerConfig | None = None
        self.scraper = MetricsScraper(
            self.pool,
            ScrapeSettings(
                interval_s=opts.scrape_interval_s,
                timeout_s=opts.scrape_timeout_s,
                unhealthy_after=opts.unhealthy_after,
                idle_interval_s=opts.scrape_idle_interval_s,
                max_scrapes_per_s=opts.scrape_budget,
                adaptive=opts.scrape_adaptive,
            ),
            on_scrape=self.metrics.on_scrape,
        )
        self.services[SCRAPER] = self.scraper  # the handler tells it which pods just got a request
        self.tracker: FlightTracker | None = None
        self.handler: ExtProcHandler | None = None
        self.access_log: AccessLogReceiver | None = None
        self.flow: FlowController | None = None
        self.shared: Any = None  # server.replication.SharedState with --shared-state
        self._serving = False
        self._grpc: grpc.aio.Server | None = None
        self._native: Any = None  # extproc.server.h2grpc.NativeGrpcServer
        self._health_grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0

    def load(self) -> SchedulerConfig:
        """Build the plugin chain (raises ConfigError with file, plugin and reason)."""
        if self.opts.tokenizers and TOKENIZERS not in self.services:
            from extproc.datalayer.tokenize import Tokenizers

            self.services[TOKENIZERS] = Tokenizers(self.opts.tokenizers)
        self.config = load_config(self.opts.config, self.pool, self.services)
        kv = self.services.get(KV_EVENTS)
        if kv is not None and self.opts.kv_events:
            from extproc.datalayer.kvevents import sources_from_json

            kv.set_sources(sources_from_json(self.opts.kv_events))
        if kv is not None and self.opts.kv_events_bind:
            kv.shared_endpoint = self.opts.kv_events_bind
        if self.opts.seed is not None:
            # every random choice (framework and each plugin's own generator) becomes reproducible
            import random as _random

            self.config.scheduler.rng.seed(self.opts.seed)
            for i, plugin in enumerate(self.config.plugins.values()):
                rng = getattr(plugin, "rng", None)
                if isinstance(rng, _random.Random):
                    rng.seed(self.opts.seed + i)
        if self.config.scheduler.reporters and self.opts.response_observe != "streamed":
            names = ", ".join(r.name for r in self.config.scheduler.reporters)
            raise ConfigError(
                self.config.path, names,
                "reports from the response body need --response-observe streamed (and an Envoy config rendered with it); "
                f"this server runs with --response-observe {self.opts.response_observe}",
            )  # fmt: skip
        for prof in self.config.scheduler.profiles.values():
            prof.plugin_timer = self.metrics.plugin_timer
        return self.config

    async def start(self) -> None:
        cfg = self.config or self.load()
        self.pool.set_endpoints(self.opts.endpoints, self.opts.labels)
        saturation = SaturationDetector.from_config(cfg.saturation)
        flow_cfg = FlowControlConfig.from_config(cfg.flow_control)
        pool = self.pool
        self.flow = (
            FlowController(
                flow_cfg,
                saturation,
                lambda model: [e for e in pool.snapshot() if model in e.models],
                cfg.fairness,
                cfg.usage_limit,
                [*cfg.band_priorities, *cfg.objectives.values()],
            )
            if flow_cfg.enabled
            else None
        )
        if self.flow is not None:
            self.services[FLOW_CONTROL] = self.flow
        on_complete = record_observation(self.metrics, cfg.scheduler)
        flow = self.flow

        def completed(request: Any, obs: Any) -> None:
            on_complete(request, obs)
            if flow is not None and flow.queued():
                flow.notify()

        self.tracker = FlightTracker(completed, observation_outcome_counter(self.metrics))
        self.tracker.start()
        self.handler = ExtProcHandler(
            self.pool,
            cfg.scheduler,
            self.metrics,
            self.tracker,
            HandlerSettings(
                max_body_bytes=self.opts.max_body_bytes,
                max_messages_per_stream=self.opts.max_messages_per_stream,
                response_observe=self.opts.response_observe,
                observe_budget=self.opts.observe_budget,
                objectives=cfg.objectives,
                conformance=self.opts.conformance,
            ),
            saturation,
            self.services,
            self.flow,
        )
        # end of request for every routed request comes from Envoy's access log (observability mode)
        self.access_log = AccessLogReceiver(self.tracker)
        self.handler.access_log = self.access_log
        if self.opts.shared_state:
            from extproc.datalayer.kvindex import KV_INDEX
            from extproc.scheduling.plugins.prefix import SERVICE_KEY as PREFIX_INDEX
            from extproc.server.replication import KEY_SEPARATOR, ReplicationCollector, ReplicationSettings, SharedState

            self.shared = SharedState(
                ReplicationSettings(url=self.opts.shared_state, replica_id=self.opts.replica_id, namespace=self.opts.shared_state_namespace),
                self.pool,
                prefix_index=self.services.get(PREFIX_INDEX),
                kv_index=self.services.get(KV_INDEX),
                flow=self.flow,
                access_log=self.access_log,
                tracker=self.tracker,
            )
            self.metrics.registry.register(ReplicationCollector(self.shared))
            self.tracker.key_prefix = self.shared.replica_id + KEY_SEPARATOR
            self.access_log.forward = self.shared.forward_finish
            self.handler.forward_observation = self.shared.forward_observation
            self.handler.release_orphans = False
            self.handler.close_after_route = self.opts.response_observe == "observability"
            await self.shared.start()
        # shared services created by plugins (KV-event manager, predictor, ...) start here
        await self.services.start_all(skip=(self.scraper,))  # the scraper starts after them
        await self.scraper.start()

        self._health = health.aio.HealthServicer()
        self._serving = True
        creds = self._server_credentials()
        if self.opts.grpc_server == "native" and creds is None:
            await self._start_native()
        else:
            await self._start_grpcio(creds)

        # gRPC health on its own port (liveness / readiness / ext_proc), as the reference does on 9003
        self._health_grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(f"{self.opts.host}:{self.opts.health_port}")
        await self._health_grpc.start()
        for svc in ("", "liveness", "readiness", EXT_PROC_SERVICE):
            await self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)

        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/debug/endpoints", self._debug_endpoints)
        app.router.add_get("/debug/replication", self._debug_replication)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self.opts.host, self.opts.metrics_port)
        await site.start()
        server = getattr(site, "_server", None)
        socks = getattr(server, "sockets", None) or []
        self.metrics_port = socks[0].getsockname()[1] if socks else self.opts.metrics_port
        log.info(
            "scheduler serving",
            extra={"grpc_port": self.grpc_port, "health_port": self.health_port, "metrics_port": self.metrics_port, "endpoints": len(self.pool), "config": cfg.path},
        )

    def _grpc_methods(self) -> dict[str, Any]:
        """Native-server methods: ext_proc Process (and whatever else the handler serves)."""
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb

        from extproc.server.h2grpc import Method

        handler = self.handler
        assert handler is not None

        async def process(call: Any) -> None:
            await handler.Process(None, call)  # type: ignore[arg-type]

        receiver = self.access_log
        assert receiver is not None

        async def access_logs(call: Any) -> None:
            await call.write(await receiver.StreamAccessLogs(None, call))  # type: ignore[arg-type]

        async def health_check(call: Any) -> None:
            # the same gRPC health answer on the ext_proc port, so Envoy can health-check the replicas of the
            # ext_proc cluster where it sends ext_proc traffic (grpc_health_check)
            await call.read()
            st = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await call.write(health_pb2.HealthCheckResponse(status=st))

        return {
            HEALTH_CHECK_METHOD: Method(health_pb2.HealthCheckRequest.FromString, health_check),
            f"/{EXT_PROC_SERVICE}/Process": Method(ext_pb.ProcessingRequest.FromString, process),
            ALS_METHOD: Method(als_pb2.StreamAccessLogsMessage.FromString, access_logs),
        }

    async def _start_native(self) -> None:
        from extproc.server.h2grpc import NativeGrpcServer

        self._native = NativeGrpcServer(
            self._grpc_methods(),
            max_message_bytes=grpc_message_limit(self.opts.max_body_bytes),
            max_concurrent_streams=self.opts.grpc_max_concurrent_streams,
        )
        self.grpc_port = await self._native.start(self.opts.host, self.opts.grpc_port)

    async def _start_grpcio(self, creds: grpc.ServerCredentials | None) -> None:
        options = [
            ("grpc.so_reuseport", 0),
            # Envoy buffers up to max_body + max(max_body, 1 MiB) (contract.envoy_buffer_limit_bytes) and forwards it in
            # one message; accept all of it so *we* answer an oversize body with a JSON 413, never a gRPC error
            ("grpc.max_receive_message_length", grpc_message_limit(self.opts.max_body_bytes)),
            ("grpc.max_send_message_length", grpc_message_limit(self.opts.max_body_bytes)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.opts.grpc_max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", self.opts.grpc_max_concurrent_streams))
        self._grpc = grpc.aio.server(options=options)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.handler, self._grpc)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log, self._grpc)
        assert self._health is not None
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)  # Envoy's grpc_health_check
        addr = f"{self.opts.host}:{self.opts.grpc_port}"
        self.grpc_port = self._grpc.add_secure_port(addr, creds) if creds else self._grpc.add_insecure_port(addr)
        if not self.grpc_port:
            raise OSError(f"cannot bind the ext_proc gRPC port {addr}")
        await self._grpc.start()

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        o = self.opts
        if not o.tls_cert:
            return None
        if not o.tls_key:
            raise ValueError("--tls-cert needs --tls-key")
        from extproc.server.tls import reloading_credentials

        return reloading_credentials(o.tls_cert, o.tls_key, o.tls_client_ca)

    async def stop(self, grace: float = 1.0) -> None:
        self._serving = False
        if self.shared is not None:
            await self.shared.stop()
            self.shared = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._native is not None:
            await self._native.stop(grace)
            self._native = None
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
            self._health_grpc = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        await self.scraper.stop()
        if self.flow is not None:
            await self.flow.stop()
        await self.services.stop_all()
        if self.tracker is not None:
            await self.tracker.stop()

    def ready_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"grpc_port": self.grpc_port, "health_port": self.health_port, "metrics_port": self.metrics_port, "pid": os.getpid()}
        kv = self.services.get(KV_EVENTS)
        shared = getattr(kv, "shared", None)
        if shared is not None:
            info["kv_events_bound"] = shared.bound_endpoint  # where pods' publishers connect (a '*' port resolved)
        return info

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _debug_replication(self, request: web.Request) -> web.Response:
        shared = self.shared
        body: dict[str, Any] = {"enabled": shared is not None, "flights": len(self.tracker) if self.tracker is not None else 0}
        if shared is not None:
            body.update(shared.status())
        if self.access_log is not None:
            body["access_log"] = {"entries": self.access_log.entries, "finished": self.access_log.finished, "forwarded": self.access_log.forwarded,
                                  "deferred": self.access_log.deferred}  # fmt: skip
            body["observations"] = {"forwarded": self.handler.foreign_observations if self.handler is not None else 0,
                                    "applied": self.access_log.observations}  # fmt: skip
        return web.json_response(body)

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy = len(self.pool.healthy())
        return web.json_response({"status": "ok", "endpoints": len(self.pool), "healthy": healthy}, status=200)

    async def _debug_endpoints(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        shared = self.shared
        out = []
        for ep in self.pool.snapshot():
            m = ep.metrics
            age = ep.metrics_age(now)
            out.append(
                {
                    "address": ep.address,
                    "healthy": ep.healthy,
                    "models": sorted(ep.models),
                    "inflight": ep.inflight,
                    # with replicas: the part of ``inflight`` the other replicas dispatched
                    "inflight_peers": shared.peer_load(ep.address) if shared is not None else 0,
                    "waiting": m.waiting,
                    "running": m.running,
                    "kv_usage": m.kv_usage,
                    "metrics_age_s": None if age == float("inf") else round(age, 3),
                    "scrape_failures": ep.scrape_failures,
                    "last_error": ep.last_error,
                    "pod_class": ep.pod_class,
                }
            )
        return web.Response(text=json.dumps(out, indent=1), content_type="application/json")
