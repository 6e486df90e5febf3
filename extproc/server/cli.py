"""``extproc serve``: run the ext_proc scheduler beside Envoy."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from extproc.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_RESPONSE_OBSERVE, RESPONSE_OBSERVE_MODES
from extproc.datalayer.scrape import ScrapeSettings

log = logging.getLogger("extproc.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sc = ScrapeSettings()  # the scraper's defaults (defined once there)
    p.add_argument("--endpoints", default="", help="comma list of model-server pods host:port (static discovery)")
    p.add_argument(
        "--endpoints-file",
        default=None,
        help="JSON file: a list of host:port or of {address, labels}, or {endpoints, labels: {address: {k: v}}} "
        "(the simulator's ready line); labels feed label filters such as decode-filter (llm-d.ai/role)",
    )
    p.add_argument("--config", default="default", help="plugin config: a YAML path or a built-in profile (default, prefix-load, random, load-only, precise-prefix, predicted-latency)")
    p.add_argument("--model", action="append", default=[], help="model name served by the pods until /v1/models answers (repeatable)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (0 = free port)")
    p.add_argument("--health-port", type=int, default=9003, help="gRPC health port (0 = free port)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port (0 = free port)")
    p.add_argument("--scrape-interval", type=float, default=sc.interval_s, help=f"seconds between /metrics scrapes per pod (default {sc.interval_s})")
    p.add_argument("--scrape-timeout", type=float, default=sc.timeout_s)
    p.add_argument("--scrape-adaptive", choices=["on", "off"], default="on" if sc.adaptive else "off", help="on: idle, unchanged pods are scraped less often (up to --scrape-idle-interval); off: every pod every --scrape-interval")
    p.add_argument("--scrape-idle-interval", type=float, default=sc.idle_interval_s, help="seconds between scrapes of an idle, unchanged pod at most (keep below the 2 s staleness bound)")
    p.add_argument("--scrape-budget", type=float, default=sc.max_scrapes_per_s, help="at most this many scrapes per second across the pool (0 = unlimited)")
    p.add_argument("--unhealthy-after", type=int, default=sc.unhealthy_after, help="consecutive scrape failures before a pod is filtered out")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="request bodies above this get 413")
    # the handler's own settings: default None = HandlerSettings' default (the handler module is heavy to import here)
    p.add_argument("--max-messages-per-stream", type=int, default=None, help="ext_proc messages one stream may send (default: the handler's)")
    p.add_argument("--response-observe", choices=RESPONSE_OBSERVE_MODES, default=DEFAULT_RESPONSE_OBSERVE, help="how the Envoy config sends response data (must match envoy-config)")
    p.add_argument("--observe-budget", type=float, default=None, help="observability mode: requests per second that also get the observation stream (TTFT, tokens); the access log finishes the rest; -1 = every request (default: the handler's)")
    p.add_argument("--kv-events-bind", default=None, metavar="ENDPOINT",
                   help="bind this ZMQ endpoint (e.g. tcp://*:5557) for every pod's KV events: each vLLM publishes to it "
                   "with topic kv@<pod>@<model> (llm-d's kvEventsConfig.zmqEndpoint); overrides the config's")
    p.add_argument("--kv-events", default=None, help="JSON file or inline JSON: {address: {endpoint, replay, topic}} (the simulator's ready line works too)")
    p.add_argument("--tokenizer", action="append", default=[], help="MODEL=hf:DIR or MODEL=sim (scheduler-side tokenization for precise prefix routing)")
    p.add_argument("--predictor-state", default=None, help="directory where the latency predictor saves/loads its live model")
    p.add_argument("--grpc-server", choices=["native", "grpcio"], default="native", help="ext_proc transport: native (HTTP/2 on the event loop, default) or grpcio (grpc.aio); TLS always uses grpcio")
    p.add_argument("--predictor-warm-start", default=None, metavar="FILE",
                   help="latency model to start from, overriding the config's warmStart: a file, 'builtin' (the packaged "
                        "model) or 'none' (start cold and learn online)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--ready-file", default=None, help="write {grpc_port, health_port, metrics_port, pid} as JSON here when serving")
    p.add_argument(
        "--conformance",
        action="store_true",
        help="conformance mode (GIE's conformance EPP): honour the request header test-epp-endpoint-selection "
        "(restrict candidates to the listed IP or IP:port) and echo x-conformance-test-served-endpoint; off by default, "
        "so clients cannot choose their destination",
    )
    p.add_argument(
        "--shared-state",
        default=os.environ.get("EXTPROC_SHARED_STATE") or None,
        metavar="URL",
        help="active-active replicas: redis://HOST:PORT/DB that every replica of this pool shares (in-flight load, "
        "approximate-prefix inserts, flow-control occupancy, foreign access-log entries); docs/active-active.md",
    )
    p.add_argument("--replica-id", default=os.environ.get("EXTPROC_REPLICA_ID", ""), help="this replica's name with --shared-state (default: random)")
    p.add_argument("--shared-state-namespace", default="extproc", help="channel prefix: replicas of one pool share it")
    p.add_argument("--seed", type=int, default=None, help="seed the pickers' random tie-breaks (tests, benchmarks)")
    p.add_argument("--log-level", default=os.environ.get("EXTPROC_LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    try:
        from extproc.datalayer import kubernetes as k8s
    except ImportError:
        return
    k8s.add_discovery_arguments(p)


def _load_json_arg(v: str | None) -> Any:
    if not v:
        return None
    if os.path.exists(v):
        with open(v, encoding="utf-8") as f:
            return json.load(f)
    return json.loads(v)


def options_from_args(args: argparse.Namespace) -> Any:
    from extproc.server.app import ServeOptions

    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    labels: dict[str, dict[str, str]] = {}
    kv: dict[str, Any] = {}
    ef = _load_json_arg(args.endpoints_file)
    if isinstance(ef, list):
        for e in ef:
            if isinstance(e, dict):  # {"address": "host:port", "labels": {"llm-d.ai/role": "decode"}}
                addr = e.get("address")
                lab = e.get("labels") or {}
                if not isinstance(addr, str) or not isinstance(lab, dict):
                    raise SystemExit(f"--endpoints-file: each object needs 'address' (host:port) and optional 'labels' mapping, got {e!r}")
                endpoints.append(addr)
                if lab:
                    labels[addr] = {str(k): str(v) for k, v in lab.items()}
            else:
                endpoints.append(str(e))
    elif isinstance(ef, dict):
        endpoints += [str(e) for e in ef.get("endpoints", [])]
        labels.update(ef.get("labels") or {})
        kv.update(ef.get("kv_events") or {})
    kvarg = _load_json_arg(args.kv_events)
    if isinstance(kvarg, dict):
        kv.update(kvarg.get("kv_events", kvarg) if "kv_events" in kvarg else kvarg)
    tokenizers: dict[str, Any] = {}
    for t in args.tokenizer:
        model, _, spec = t.partition("=")
        kind, _, path = spec.partition(":")
        if not model or kind not in ("hf", "sim"):
            raise SystemExit(f"--tokenizer {t!r}: expected MODEL=hf:DIR or MODEL=sim")
        tokenizers[model] = {"kind": kind, "path": path or None}
    handler_overrides = {k: v for k, v in (("max_messages_per_stream", args.max_messages_per_stream), ("observe_budget", args.observe_budget)) if v is not None}
    return ServeOptions(
        **handler_overrides,
        endpoints=endpoints,
        labels=labels,
        config=args.config,
        models=list(args.model),
        host=args.host,
        grpc_port=args.grpc_port,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        scrape_interval_s=args.scrape_interval,
        scrape_timeout_s=args.scrape_timeout,
        scrape_adaptive=args.scrape_adaptive == "on",
        scrape_idle_interval_s=args.scrape_idle_interval,
        scrape_budget=args.scrape_budget,
        unhealthy_after=args.unhealthy_after,
        max_body_bytes=args.max_body_bytes,
        response_observe=args.response_observe,
        kv_events=kv,
        kv_events_bind=args.kv_events_bind,
        tokenizers=tokenizers,
        predictor_state_dir=args.predictor_state,
        grpc_server=args.grpc_server,
        predictor_warm_start=args.predictor_warm_start,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        seed=args.seed,
        conformance=args.conformance,
        shared_state=args.shared_state,
        replica_id=args.replica_id,
        shared_state_namespace=args.shared_state_namespace,
    )


async def _serve(args: argparse.Namespace) -> int:
    from extproc.scheduling.config import ConfigError
    from extproc.server.app import SchedulerServer

    opts = options_from_args(args)
    server = SchedulerServer(opts)
    try:
        server.load()
    except ConfigError as e:
        print(f"extproc: config error: {e}", file=sys.stderr)
        return 2
    discovery = None
    try:
        from extproc.datalayer import kubernetes as k8s

        discovery = k8s.discovery_from_args(args, server.pool)
    except ImportError:
        discovery = None
    if not opts.endpoints and discovery is None:
        print("extproc: no endpoints: give --endpoints, --endpoints-file, or Kubernetes discovery flags", file=sys.stderr)
        return 2
    if discovery is not None:
        # the first list must be applied before we report ready (readiness must not say SERVING on an empty pool)
        await discovery.start()
    await server.start()
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(server.ready_info(), f)
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if discovery is not None:
        await discovery.stop()
    await server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    from extproc.observe.logging import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        import uvloop

        return uvloop.run(_serve(args))
    except ImportError:
        return asyncio.run(_serve(args))
