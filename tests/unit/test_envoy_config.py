"""Rendering of the Envoy bootstrap (every option), validation through the real binary, the CLI,
and the reference files under envoy/ (which must not drift from the renderer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoy_config as ec
from extproc.cli import main as cli_main
from extproc.netutil import HostPort, free_port, free_ports, parse_host_port, parse_host_ports

REPO = Path(__file__).resolve().parents[2]


def _hcm(boot: dict[str, Any]) -> dict[str, Any]:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _filters(boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in _hcm(boot)["http_filters"]}


def _routes(boot: dict[str, Any]) -> list[dict[str, Any]]:
    return _hcm(boot)["route_config"]["virtual_hosts"][0]["routes"]


def _clusters(boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in boot["static_resources"]["clusters"]}


def _render(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"listen": "127.0.0.1:8081", "extproc": "127.0.0.1:9002"}
    args.update(kw)
    return ec.render_bootstrap(**args)


# ---------------------------------------------------------------- netutil


def test_parse_host_port_forms() -> None:
    assert parse_host_port("10.0.0.1:8000") == HostPort("10.0.0.1", 8000)
    assert parse_host_port("[::1]:9") == HostPort("::1", 9)
    assert str(HostPort("::1", 9)) == "[::1]:9"
    assert parse_host_port(":80", default_host="0.0.0.0") == HostPort("0.0.0.0", 80)
    assert parse_host_ports("a:1, b:2,,") == (HostPort("a", 1), HostPort("b", 2))
    assert parse_host_ports(["a:1,b:2", "c:3"]) == (HostPort("a", 1), HostPort("b", 2), HostPort("c", 3))
    for bad in ("", "host", "host:x", "host:70000", "::1:80", "[::1]80", ":80"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_free_ports_are_distinct_and_bindable() -> None:
    import socket

    ports = free_ports(3)
    assert len(set(ports)) == 3
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for s, port in zip((a, b, c), ports):
            s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- the extproc chain


def test_filter_chain_order_and_header_stripping() -> None:
    boot = _render()
    hcm = _hcm(boot)
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.header_mutation",
        "extproc",
        "extproc-observe",
        "envoy.filters.http.router",
    ]
    removed = [m["remove"] for m in _filters(boot)["envoy.filters.http.header_mutation"]["mutations"]["request_mutations"]]
    assert removed == list(ec.SPOOFABLE_HEADERS)
    early = hcm["early_header_mutation_extensions"]
    assert [m["remove"] for m in early[0]["typed_config"]["mutations"]] == list(ec.SPOOFABLE_HEADERS)
    assert hcm.get("codec_type", "AUTO") == "AUTO"  # HTTP/1.1 and h2c


def test_main_extproc_filter() -> None:
    main = _filters(_render())["extproc"]
    assert main["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"
    assert main["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",  # observability mode: responses are seen by the observation filter
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }  # response_body_mode NONE is the proto default, so it is left out
    assert main["message_timeout"] == "2s"
    assert main["route_cache_action"] == "CLEAR"
    assert main.get("allow_mode_override", False) is False
    assert main.get("failure_mode_allow", False) is False  # fail-close by default
    assert main["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    assert main["mutation_rules"]["disallow_system"] is True
    import re

    allow = re.compile(main["mutation_rules"]["allow_expression"]["regex"])
    for name in (ec.DESTINATION_HEADER, "x-extproc-request-id", "content-length"):
        assert allow.match(name)
    assert not allow.match("authorization")


@pytest.mark.parametrize(("mode", "allow"), [("fail-open", True), ("fail-close", False)])
def test_failure_mode(mode: str, allow: bool) -> None:
    main = _filters(_render(failure_mode=mode, message_timeout_s=0.25))["extproc"]
    assert main.get("failure_mode_allow", False) is allow
    assert main["message_timeout"] == "0.250s"


def test_response_observe_modes() -> None:
    observe = _filters(_render(response_observe="observability"))
    obs = observe["extproc-observe"]
    assert obs["observability_mode"] is True
    assert obs["failure_mode_allow"] is True
    assert obs["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SEND",
    }
    assert "response_body_mode" not in observe["extproc"]["processing_mode"]

    streamed = _filters(_render(response_observe="streamed"))
    assert "extproc-observe" not in streamed
    assert streamed["extproc"]["processing_mode"]["response_body_mode"] == "STREAMED"
    assert streamed["extproc"]["processing_mode"]["response_trailer_mode"] == "SEND"

    none = _filters(_render(response_observe="none"))
    assert "extproc-observe" not in none
    assert "response_body_mode" not in none["extproc"]["processing_mode"]
    assert none["extproc"]["processing_mode"]["response_header_mode"] == "SEND"


def test_routes_without_fallback_give_json_503() -> None:
    boot = _render(route_timeout_s=0, stream_idle_timeout_s=600, retries=3)
    route_a, route_b = _routes(boot)[-2:]  # observability mode puts the sampled-observation route first
    assert route_a["match"]["headers"] == [{"name": ec.DESTINATION_HEADER, "present_match": True}]
    assert route_a["route"]["cluster"] == "extproc_original_dst"
    assert route_a["route"]["timeout"] == "0s"
    assert route_a["route"]["idle_timeout"] == "600s"
    assert route_a["route"]["retry_policy"]["num_retries"] == 3
    assert "connect-failure" in route_a["route"]["retry_policy"]["retry_on"]
    served = route_a["response_headers_to_add"][0]["header"]
    # Envoy echoes the scheduler's pick (the request header it set) without a gRPC round trip
    assert served == {"key": ec.SERVED_HEADER, "value": "%REQ(x-gateway-destination-endpoint)%"}
    assert route_b["direct_response"]["status"] == 503
    body = json.loads(route_b["direct_response"]["body"]["inline_string"])
    assert body == {
        "error": {"message": "no destination selected", "type": "service_unavailable", "code": "no_destination"}
    }
    assert set(_clusters(boot)) == {"extproc", "extproc_original_dst"}
    odst = _clusters(boot)["extproc_original_dst"]
    assert odst["type"] == "ORIGINAL_DST" and odst["lb_policy"] == "CLUSTER_PROVIDED"
    assert odst["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": ec.DESTINATION_HEADER}


def test_fallback_cluster_and_route() -> None:
    boot = _render(fallback_endpoints="10.0.0.1:8000,10.0.0.2:8000", lb_policy="LEAST_REQUEST", retries=0)
    route_a, route_b = _routes(boot)[-2:]  # observability mode puts the sampled-observation route first
    assert "retry_policy" not in route_a["route"]
    assert route_b["route"]["cluster"] == "extproc_fallback"
    fb = _clusters(boot)["extproc_fallback"]
    assert fb["type"] == "STATIC" and fb["lb_policy"] == "LEAST_REQUEST"
    addrs = [e["endpoint"]["address"]["socket_address"] for e in fb["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert addrs == [{"address": "10.0.0.1", "port_value": 8000}, {"address": "10.0.0.2", "port_value": 8000}]
    assert fb["health_checks"][0]["http_health_check"]["path"] == "/health"
    assert fb["outlier_detection"]["consecutive_5xx"] == 5
    no_hc = _clusters(_render(fallback_endpoints="10.0.0.1:8000", fallback_health_path=""))["extproc_fallback"]
    assert "health_checks" not in no_hc


def test_dns_names_use_strict_dns() -> None:
    clusters = _clusters(_render(extproc="scheduler.default.svc:9002", fallback_endpoints="vllm:8000"))
    assert clusters["extproc"]["type"] == "STRICT_DNS"
    assert clusters["extproc_fallback"]["type"] == "STRICT_DNS"


def test_extproc_cluster_is_http2_with_keepalive() -> None:
    cluster = _clusters(_render(connect_timeout_s=0.5))["extproc"]
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    assert cluster["connect_timeout"] == "0.500s"
    assert cluster["upstream_connection_options"]["tcp_keepalive"]["keepalive_time"] == 30
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000


def test_buffer_limit_leaves_room_for_the_scheduler_413() -> None:
    for max_body in (1024, 8 * 1024 * 1024, 64 * 1024 * 1024):
        listener = _render(max_body_bytes=max_body)["static_resources"]["listeners"][0]
        assert listener["per_connection_buffer_limit_bytes"] >= 2 * max_body


def test_fallback_retries_uses_override_host() -> None:
    boot = _render(fallback_retries=True, endpoints="10.0.0.1:8000,10.0.0.2:8000")
    route_a = _routes(boot)[0]
    assert route_a["route"]["cluster"] == "extproc_pool"
    pool = _clusters(boot)["extproc_pool"]
    assert "extproc_original_dst" not in _clusters(boot)
    policy = pool["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    sources = policy["typed_config"]["override_host_sources"]
    assert sources[0] == {"metadata": {"key": "envoy.lb", "path": [{"key": ec.DESTINATION_HEADER}]}}
    assert sources[1] == {"header": ec.DESTINATION_HEADER}
    assert "fallback_policy" in policy["typed_config"]
    with pytest.raises(ValueError):
        _render(fallback_retries=True)


def test_envoy_only_render() -> None:
    boot = ec.render_bootstrap(listen="127.0.0.1:0", endpoints=["127.0.0.1:1", "127.0.0.1:2"], lb_policy="LEAST_REQUEST")
    assert [f["name"] for f in _hcm(boot)["http_filters"]] == ["envoy.filters.http.router"]
    assert "early_header_mutation_extensions" not in _hcm(boot)
    assert _routes(boot)[0]["route"]["cluster"] == "backends"
    assert _clusters(boot)["backends"]["lb_policy"] == "LEAST_REQUEST"
    rr = ec.render_bootstrap(listen="127.0.0.1:0", endpoints="127.0.0.1:1")
    assert "lb_policy" not in _clusters(rr)["backends"]  # ROUND_ROBIN is the proto default
    full = ec.render_bootstrap(listen="127.0.0.1:0", endpoints="127.0.0.1:1", lb_policy="LEAST_REQUEST_FULL_SCAN")
    policy = _clusters(full)["backends"]["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["typed_config"]["selection_method"] == "FULL_SCAN"
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError):
        ec.render_bootstrap(listen="127.0.0.1:0")  # neither extproc nor endpoints
    with pytest.raises(ValueError):
        _render(failure_mode="maybe")
    with pytest.raises(ValueError):
        _render(response_observe="sometimes")
    with pytest.raises(ValueError):
        _render(lb_policy="RANDOM")
    with pytest.raises(ValueError):
        _render(max_body_bytes=0)
    with pytest.raises(ValueError):
        _render(listen="nowhere")


def test_include_has_the_pieces() -> None:
    inc = ec.render_include(extproc="127.0.0.1:9002", response_observe="none")
    assert [f["name"] for f in inc["http_filters"]][-1] == "envoy.filters.http.router"
    assert [c["name"] for c in inc["clusters"]] == ["extproc", "extproc_original_dst"]
    assert len(inc["routes"]) == 2 and inc["early_header_mutation_extensions"]


def test_observability_mode_access_log_and_sampled_observation_routes() -> None:
    def hcm(**kw: object) -> dict:
        b = _render(**kw) if "listen" in kw else ec.render_bootstrap(listen="127.0.0.1:0", extproc="127.0.0.1:9002", **kw)
        return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]

    h = hcm()
    (al,) = h["access_log"]
    assert al["name"] == "envoy.access_loggers.http_grpc"
    cfg = al["typed_config"]
    assert cfg["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"
    assert cfg["additional_request_headers_to_log"] == ["x-extproc-request-id"]
    assert al["filter"]["header_filter"]["header"]["name"] == "x-extproc-request-id"
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes[:2]] == ["extproc_destination_observed", "extproc_destination"]
    assert [m["name"] for m in routes[0]["match"]["headers"]] == ["x-gateway-destination-endpoint", "x-extproc-observe"]
    assert "typed_per_filter_config" not in routes[0]
    assert routes[1]["typed_per_filter_config"]["extproc-observe"]["disabled"] is True
    assert all(r.get("request_headers_to_remove") == ["x-extproc-observe"] for r in routes[:2])
    assert "x-extproc-observe" in ec.SPOOFABLE_HEADERS  # a client cannot ask for (or dodge) observation
    for kw in ({"access_log": False}, {"response_observe": "none"}, {"response_observe": "streamed"}):
        h = hcm(**kw)
        assert not h.get("access_log")
        assert [r["name"] for r in h["route_config"]["virtual_hosts"][0]["routes"]][0] == "extproc_destination"


# ---------------------------------------------------------------- through the real binary


@pytest.mark.envoy
@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_mode": "fail-open", "fallback_endpoints": "127.0.0.1:8000,127.0.0.1:8001"},
        {"failure_mode": "fail-close", "response_observe": "streamed", "retries": 0},
        {
            "response_observe": "none",
            "fallback_retries": True,
            "endpoints": "127.0.0.1:8000,127.0.0.1:8001",
            "lb_policy": "LEAST_REQUEST_FULL_SCAN",
        },
        {"extproc": None, "endpoints": "127.0.0.1:8000", "lb_policy": "LEAST_REQUEST"},
    ],
)
def test_envoy_accepts(kwargs: dict[str, Any]) -> None:
    ec.validate_bootstrap(_render(**kwargs))


@pytest.mark.envoy
def test_envoy_rejects_with_its_message() -> None:
    boot = _render()
    boot["static_resources"]["clusters"][0]["no_such_field"] = 1
    with pytest.raises(ec.EnvoyValidationError, match="no_such_field"):
        ec.validate_bootstrap(boot)


@pytest.mark.envoy
def test_cli_writes_validated_bootstrap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.yaml"
    rc = cli_main(
        [
            "envoy-config",
            "--listen",
            "127.0.0.1:0",
            "--extproc",
            "127.0.0.1:9002",
            "--failure-mode",
            "fail-open",
            "--fallback-endpoints",
            "127.0.0.1:8000",
            "--response-observe",
            "streamed",
            "--max-body-bytes",
            "1048576",
            "--message-timeout",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    boot = yaml.safe_load(out.read_text())
    assert _filters(boot)["extproc"]["failure_mode_allow"] is True
    assert _filters(boot)["extproc"]["message_timeout"] == "0.500s"
    assert boot["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] >= 2 * 1048576

    assert cli_main(["envoy-config", "--listen", "bad", "--extproc", "127.0.0.1:9002", "--no-validate"]) == 2
    assert "bad address" in capsys.readouterr().err


def test_cli_reports_envoy_rejection(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def reject(config: Any, **_: Any) -> None:
        raise ec.EnvoyValidationError("Proto constraint validation failed")

    monkeypatch.setattr(ec, "validate_bootstrap", reject)
    assert cli_main(["envoy-config", "--extproc", "127.0.0.1:9002"]) == 1
    assert "Proto constraint validation failed" in capsys.readouterr().err


def test_cli_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["envoy-config", "--endpoints", "127.0.0.1:1,127.0.0.1:2", "--format", "json", "--no-validate"])
    assert rc == 0
    boot = json.loads(capsys.readouterr().out)
    assert len(_clusters(boot)["backends"]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


# ---------------------------------------------------------------- envoy/ reference files


@pytest.mark.parametrize("name", ["bootstrap.yaml", "extproc-include.yaml"])
def test_reference_files_match_renderer(name: str) -> None:
    on_disk = (REPO / "envoy" / name).read_text()
    expected = ec.reference_files()[name]
    assert yaml.safe_load(on_disk) == yaml.safe_load(expected), (
        f"envoy/{name} drifted; regenerate: extproc envoy-config --write-reference-files envoy"
    )


@pytest.mark.envoy
def test_reference_bootstrap_validates() -> None:
    ec.validate_bootstrap((REPO / "envoy" / "bootstrap.yaml").read_text())


@pytest.mark.envoy
def test_reference_include_validates_inside_a_bootstrap() -> None:
    inc = yaml.safe_load((REPO / "envoy" / "extproc-include.yaml").read_text())
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mine",
        "early_header_mutation_extensions": inc["early_header_mutation_extensions"],
        "http_filters": inc["http_filters"],
        "route_config": {"virtual_hosts": [{"name": "mine", "domains": ["*"], "routes": inc["routes"]}]},
        "access_log": inc["access_log"],
    }
    boot = {
        "static_resources": {
            "listeners": [
                {
                    "name": "mine",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": inc["clusters"],
        }
    }
    ec.validate_bootstrap(boot)


# ---------------------------------------------------------------- decision retry (active-active)


def _listener(boot: dict[str, Any], name: str) -> dict[str, Any]:
    (lst,) = [x for x in boot["static_resources"]["listeners"] if x["name"] == name]
    return lst


@pytest.mark.parametrize("mode", ["fail-close", "fail-open"])
def test_decision_retry_with_replicas(mode: str) -> None:
    """Replicated: the public listener's ext_proc fails open onto the retry route (never onto a pod); the internal
    listener runs the same chain with the configured failure mode and routes A/B."""
    boot = _render(extproc="127.0.0.1:9002,127.0.0.1:9003", failure_mode=mode,
                   **({"fallback_endpoints": "127.0.0.1:8000"} if mode == "fail-open" else {}))  # fmt: skip
    assert [x["name"] for x in boot["static_resources"]["listeners"]] == [ec.LISTENER_NAME, ec.DECISION_RETRY_LISTENER]
    assert _filters(boot)["extproc"]["failure_mode_allow"] is True
    routes = _routes(boot)
    assert [r["name"] for r in routes] == ["extproc_destination_observed", "extproc_destination", "extproc_decision_retry"]
    retry = routes[-1]
    assert retry["match"] == {"prefix": "/"} and retry["route"]["cluster"] == ec.DECISION_RETRY_CLUSTER
    assert "extproc-observe" in retry["typed_per_filter_config"]  # observed by the internal chain, not twice
    inner = _listener(boot, ec.DECISION_RETRY_LISTENER)
    assert "internal_listener" in inner and "address" not in inner  # reachable only through the cluster
    ihcm = inner["filter_chains"][0]["filters"][0]["typed_config"]
    ifilters = {f["name"]: f["typed_config"] for f in ihcm["http_filters"]}
    assert ifilters["extproc"].get("failure_mode_allow", False) is (mode == "fail-open")
    assert ihcm["early_header_mutation_extensions"]  # the first pass's partial mutations and spoofs stripped again
    assert ihcm["access_log"] and ihcm["local_reply_config"]
    inames = [r["name"] for r in ihcm["route_config"]["virtual_hosts"][0]["routes"]]
    assert inames == ["extproc_destination_observed", "extproc_destination",
                      "extproc_fallback" if mode == "fail-open" else "extproc_no_destination"]  # fmt: skip
    cl = _clusters(boot)[ec.DECISION_RETRY_CLUSTER]
    addr = cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr == {"envoy_internal_address": {"server_listener_name": ec.DECISION_RETRY_LISTENER}}
    assert [e["name"] for e in boot["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]


def test_decision_retry_off_by_default_with_one_scheduler_and_on_demand() -> None:
    one = _render()
    assert len(one["static_resources"]["listeners"]) == 1 and "bootstrap_extensions" not in one
    assert ec.DECISION_RETRY_CLUSTER not in _clusters(one)
    off = _render(extproc="127.0.0.1:9002,127.0.0.1:9003", decision_retry=False)
    assert len(off["static_resources"]["listeners"]) == 1
    assert _filters(off)["extproc"].get("failure_mode_allow", False) is False
    on = _render(decision_retry=True)  # one replica, retried on itself (e.g. a restarted process behind a Service)
    assert len(on["static_resources"]["listeners"]) == 2
    with pytest.raises(ValueError, match="decision retry"):
        ec.EnvoyConfigOptions(listen=HostPort("127.0.0.1", 1), endpoints=(HostPort("127.0.0.1", 2),), decision_retry=True)


@pytest.mark.envoy
def test_decision_retry_bootstrap_and_include_validate() -> None:
    ec.validate_bootstrap(_render(extproc="127.0.0.1:9002,127.0.0.1:9003"))
    ec.validate_bootstrap(_render(extproc="127.0.0.1:9002,127.0.0.1:9003", failure_mode="fail-open", fallback_endpoints="127.0.0.1:8000"))
    inc = ec.render_include(extproc="127.0.0.1:9002,127.0.0.1:9003")
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mine",
        "early_header_mutation_extensions": inc["early_header_mutation_extensions"],
        "http_filters": inc["http_filters"],
        "route_config": {"virtual_hosts": [{"name": "mine", "domains": ["*"], "routes": inc["routes"]}]},
        "access_log": inc["access_log"],
    }
    boot = {
        "bootstrap_extensions": inc["bootstrap_extensions"],
        "static_resources": {
            "listeners": [
                {
                    "name": "mine",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                },
                *inc["listeners"],
            ],
            "clusters": inc["clusters"],
        },
    }
    ec.validate_bootstrap(boot)
