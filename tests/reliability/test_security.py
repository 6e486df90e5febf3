"""Security: client-supplied routing headers never choose the upstream, TLS/mTLS on the ext_proc port with
certificate reload, health and metrics on their own ports, and no prompt text or credentials in info logs."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.harness import SchedulerProcess, Stack, StackSpec
from extproc.sim.fleet import SimFleet
from reliability_lib import MODEL, PKI, Trap, error_of, post

pytestmark = pytest.mark.envoy

SPOOF_HEADERS = ("x-gateway-destination-endpoint", "X-Gateway-Destination-Endpoint", "x-gateway-destination-endpoint-subset", "x-gateway-destination-endpoint-served")


# --------------------------------------------------------------------------------------------- header stripping
async def _spoof_round(s: aiohttp.ClientSession, url: str, trap: str, fleet: SimFleet, scheduler_up: bool, fail_open: bool) -> None:
    """Every kind of request carrying a forged routing header; the caller checks the trap saw nothing."""
    served = scheduler_up or fail_open  # a request with a body reaches a pool pod
    for name in SPOOF_HEADERS:
        spoof = {name: trap}
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": "spoof test", "max_tokens": 2}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}),
        ):
            status, headers, _ = await post(s, url, path, body, spoof)
            if served:
                assert status == 200 and headers["x-inference-pod"] in fleet.endpoints, (name, path, status)
            else:
                assert status >= 500, (name, path, status)
        # no body at all: no request_body message, so the scheduler never sets the header itself
        expected = {"/v1/models": 200, "/v1/completions": 400, "/admin/anything": 404} if scheduler_up else {}
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/admin/anything")):
            async with s.request(method, url + path, headers=spoof) as r:
                await r.read()
                if scheduler_up:
                    assert r.status == expected[path], (name, path, r.status)
                elif not fail_open:
                    assert r.status >= 500, (name, path, r.status)
                elif path == "/v1/models":
                    assert r.status == 200 and r.headers["x-inference-pod"] in fleet.endpoints  # fallback pod
    # the header twice (Envoy joins the values) and a comma list naming the trap first
    status, _, _ = await post(s, url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, {"x-gateway-destination-endpoint": f"{trap},{trap}"})
    assert status == 200 if served else status >= 500


@pytest.mark.parametrize("mode", ["fail-close", "fail-open"])
async def test_spoofed_routing_headers_never_reach_trap(fleet: SimFleet, mode: str) -> None:
    async with Trap() as trap:
        async with Stack(StackSpec(endpoints=fleet.endpoints, failure_mode=mode, models=[MODEL])) as st, aiohttp.ClientSession() as s:
            await _spoof_round(s, st.url, trap.address, fleet, scheduler_up=True, fail_open=mode == "fail-open")
            await st.stop_scheduler(hard=True)
            await _spoof_round(s, st.url, trap.address, fleet, scheduler_up=False, fail_open=mode == "fail-open")
        assert trap.hits == []


# --------------------------------------------------------------------------------------------- TLS / mTLS
def _exchange_msgs() -> list[pb.ProcessingRequest]:
    req = pb.ProcessingRequest()
    for k, v in ((":path", b"/v1/completions"), (":method", b"POST")):
        h = req.request_headers.headers.headers.add()
        h.key = k
        h.raw_value = v
    body = pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps({"model": MODEL, "prompt": "tls", "max_tokens": 2}).encode(), end_of_stream=True))
    return [req, body]


async def _route_over(channel: grpc.aio.Channel) -> list[str]:
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    out = []
    for m in _exchange_msgs():
        await call.write(m)
        out.append(await asyncio.wait_for(call.read(), 20))
    await call.done_writing()
    return [r.WhichOneof("response") for r in out]


def _peer_cert(port: int, ca: Path, client: tuple[Path, Path] | None) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


async def _start_tls_scheduler(fleet: SimFleet, cert: Path, key: Path, client_ca: Path | None) -> SchedulerProcess:
    args = ["--endpoints", ",".join(fleet.endpoints), "--model", MODEL, "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "warning"]
    if client_ca is not None:
        args += ["--tls-client-ca", str(client_ca)]
    return await SchedulerProcess.start(args)


async def test_tls_serves_and_reloads_certificates(fleet: SimFleet, tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    first, cert, key = pki.write_server("extproc-1")
    sched = await _start_tls_scheduler(fleet, cert, key, None)
    try:
        target = f"localhost:{sched.grpc_port}"
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_path.read_bytes())
        async with grpc.aio.secure_channel(target, creds) as ch:
            assert await _route_over(ch) == ["request_headers", "request_body"]
        # a plaintext client cannot talk to the TLS port
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises((grpc.aio.AioRpcError, asyncio.TimeoutError)):
                await asyncio.wait_for(_route_over(ch), 10)
        der = await asyncio.to_thread(_peer_cert, sched.grpc_port, pki.ca_path, None)
        assert der == first.public_bytes(serialization.Encoding.DER)
        # rotate: new files (new mtime) → the next handshake presents the new certificate, no restart
        second, _, _ = pki.write_server("extproc-2")
        later = os.stat(cert).st_mtime_ns + 1_000_000_000
        os.utime(cert, ns=(later, later))
        os.utime(key, ns=(later, later))
        der2 = await asyncio.to_thread(_peer_cert, sched.grpc_port, pki.ca_path, None)
        assert der2 == second.public_bytes(serialization.Encoding.DER) != der
        async with grpc.aio.secure_channel(target, creds) as ch:
            assert await _route_over(ch) == ["request_headers", "request_body"]
        assert sched.proc.returncode is None
    finally:
        await sched.stop()


async def test_mtls_requires_client_certificate(fleet: SimFleet, tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    _, cert, key = pki.write_server("extproc")
    _, client_pem, client_key = pki.issue("envoy", server=False)
    (tmp_path / "other").mkdir()
    other = PKI(tmp_path / "other")
    _, rogue_pem, rogue_key = other.issue("rogue", server=False)
    sched = await _start_tls_scheduler(fleet, cert, key, pki.ca_path)
    try:
        target = f"localhost:{sched.grpc_port}"
        ca = pki.ca_path.read_bytes()
        ok = grpc.ssl_channel_credentials(root_certificates=ca, private_key=client_key, certificate_chain=client_pem)
        async with grpc.aio.secure_channel(target, ok) as ch:
            assert await _route_over(ch) == ["request_headers", "request_body"]
        for creds in (
            grpc.ssl_channel_credentials(root_certificates=ca),  # no client certificate
            grpc.ssl_channel_credentials(root_certificates=ca, private_key=rogue_key, certificate_chain=rogue_pem),  # wrong CA
        ):
            async with grpc.aio.secure_channel(target, creds) as ch:
                with pytest.raises((grpc.aio.AioRpcError, asyncio.TimeoutError)) as ei:
                    await asyncio.wait_for(_route_over(ch), 10)
                if isinstance(ei.value, grpc.aio.AioRpcError):
                    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sched.proc.returncode is None
    finally:
        await sched.stop()


# --------------------------------------------------------------------------------------------- ports
async def test_health_and_metrics_on_their_own_ports(fleet: SimFleet) -> None:
    sched = await SchedulerProcess.start(["--endpoints", ",".join(fleet.endpoints), "--model", MODEL, "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", "--log-level", "warning"])
    try:
        info = sched.info
        ports = {info["grpc_port"], info["health_port"], info["metrics_port"]}
        assert len(ports) == 3
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['health_port']}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for svc in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10)
                assert r.status == health_pb2.HealthCheckResponse.SERVING, svc
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            # the health port does not serve ext_proc
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await _route_over(ch)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['grpc_port']}") as ch:
            assert await _route_over(ch) == ["request_headers", "request_body"]
            # the ext_proc port answers gRPC health too (Envoy's grpc_health_check of a replicated ext_proc cluster
            # probes the port it sends ext_proc traffic to; docs/active-active.md) — and nothing else besides ext_proc
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/grpc.health.v1.Health/Watch")(b"", timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{info['metrics_port']}/metrics") as r:
                assert r.status == 200
                assert "extproc_pod_inflight_requests" in await r.text()
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{info['grpc_port']}/metrics") as r:
                    await r.read()
                    raise aiohttp.ClientError(f"gRPC port answered HTTP/1.1 with {r.status}")
    finally:
        await sched.stop()


# --------------------------------------------------------------------------------------------- logs
async def test_no_prompt_or_credentials_in_info_logs(fleet: SimFleet) -> None:
    secret_prompt = "PROMPT-CANARY-7f3a9c uniquely identifiable user text"
    token = "Bearer sk-CANARY-0d1e2f3a4b5c"
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], scheduler_args=["--log-level", "info"])
    async with Stack(spec) as st, aiohttp.ClientSession() as s:
        assert st.scheduler is not None
        log_path = st.scheduler.log_path
        auth = {"authorization": token, "x-api-key": token}
        results: list[tuple[int, bytes]] = []
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": secret_prompt, "max_tokens": 2}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 2, "stream": True}),
            ("/v1/completions", {"model": "no-such-model " + secret_prompt, "prompt": secret_prompt}),  # 404 path logs
            ("/v1/completions", {"model": MODEL, "prompt": secret_prompt, "max_tokens": "many"}),  # 400 path logs
        ):
            status, _, data = await post(s, st.url, path, body, auth)
            results.append((status, data))
        raw = (secret_prompt + '"{').encode()
        status, _, data = await post(s, st.url, "/v1/completions", raw, auth)  # invalid JSON with the prompt in it
        results.append((status, data))
        assert [r[0] for r in results] == [200, 200, 404, 400, 400]
        error_of(results[3][1])
        await st.stop_scheduler()  # flush and close the log
    text = log_path.read_text(errors="replace")
    assert "scheduler serving" in text and "request rejected" in text  # info lines were written
    assert "CANARY" not in text
    assert secret_prompt not in text and token not in text
