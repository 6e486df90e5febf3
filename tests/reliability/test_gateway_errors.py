"""What a client can get from the gateway itself, through real Envoy: every error in the OpenAI JSON shape with
its status intact (Envoy's own local replies included, read with curl), Envoy → scheduler over mTLS, flights
that a client-chosen ``x-request-id`` cannot collide, prompt batches and embeddings served end to end."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import pytest

from extproc.envoy_config import SchedulerTls
from extproc.harness import Stack, StackSpec
from extproc.sim.fleet import SimFleet
from reliability_lib import MODEL, PKI, error_of, post, wait_until

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]


def _curl() -> str:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl not installed (make test installs it)")
    return exe


async def _curl_post(url: str, source: list[str], *, data: bytes | None = None, extra: list[str] = ()) -> tuple[int, str, bytes]:  # type: ignore[assignment]
    """POST with curl (``source``: e.g. ``["--data-binary", "@file"]``); returns (status, content type, body)."""
    marker = b"\n--curl-status:"
    proc = await asyncio.create_subprocess_exec(
        _curl(), "-sS", "-o", "-", "-w", marker.decode() + "%{http_code} %{content_type}", "-H", "content-type: application/json",
        *extra, *source, url,
        stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(data), 90)
    body, _, tail = out.rpartition(marker)
    status, _, ctype = tail.decode().partition(" ")
    assert status.isdigit(), (out[-300:], err[-300:])
    return int(status), ctype, body


async def test_envoy_local_replies_are_openai_json(fleet: SimFleet, tmp_path: Path) -> None:
    big = tmp_path / "25mb.json"
    big.write_bytes(b'{"model":"' + MODEL.encode() + b'","prompt":"' + b"a" * (25 * 1024 * 1024) + b'"}')
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL])) as st:
        url = st.url + "/v1/completions"
        # 25 MB body with content-length: over Envoy's 16 MiB buffer, answered by Envoy itself
        status, ctype, body = await _curl_post(url, ["--data-binary", f"@{big}"])
        assert status == 413 and ctype.startswith("application/json"), (status, ctype, body[:200])
        err = error_of(body)
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        assert "request_payload_too_large" in err["message"]  # Envoy's response code details, kept for diagnosis
        # 40 MB chunked upload (no content-length)
        chunked = b"a" * (40 * 1024 * 1024)
        status, ctype, body = await _curl_post(url, ["-H", "transfer-encoding: chunked", "--data-binary", "@-"], data=chunked)
        assert status == 413 and ctype.startswith("application/json") and error_of(body)["code"] == "request_too_large"
        # the scheduler's own JSON errors pass through untouched (not re-wrapped by the local-reply mapper)
        status, ctype, body = await _curl_post(url, ["--data-binary", "{not json"])
        assert status == 400 and error_of(body)["code"] == "invalid_json"
        status, _, body = await _curl_post(url, ["--data-binary", json.dumps({"model": "nope", "prompt": "x"})])
        assert status == 404 and error_of(body)["code"] == "model_not_found"
        # request headers over Envoy's 60 KiB limit: Envoy's codec answers 431
        status, ctype, body = await _curl_post(url, ["--data-binary", "{}"], extra=["-H", "x-big: " + "b" * 70_000])
        assert status == 431 and ctype.startswith("application/json") and error_of(body)["code"] == "headers_too_large"
        # and the gateway still serves
        ok = json.dumps({"model": MODEL, "prompt": "still fine", "max_tokens": 2})
        status, _, body = await _curl_post(url, ["--data-binary", ok])
        assert status == 200 and json.loads(body)["choices"]


async def test_scheduler_down_fail_close_is_json_500(fleet: SimFleet) -> None:
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], start_scheduler=False)
    async with Stack(spec) as st:
        status, ctype, body = await _curl_post(st.url + "/v1/completions", ["--data-binary", json.dumps({"model": MODEL, "prompt": "x"})])
        assert status == 500 and ctype.startswith("application/json"), (status, ctype, body)
        err = error_of(body)
        assert err["type"] == "internal_error" and err["code"] == "gateway_error"
        # fail-open with no fallback endpoints: route B's own JSON 503, not re-wrapped
    spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], start_scheduler=False, failure_mode="fail-open", fallback_endpoints=[])
    async with Stack(spec) as st:
        status, _, body = await _curl_post(st.url + "/v1/completions", ["--data-binary", json.dumps({"model": MODEL, "prompt": "x"})])
        assert status == 503 and error_of(body)["code"] == "no_destination"


async def test_scheduler_hung_is_json_504(fleet: SimFleet) -> None:
    """A scheduler that accepts the connection and never answers: Envoy's message timeout, as JSON."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never read, never answer

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], start_scheduler=False, grpc_port=port, envoy_args={"message_timeout_s": 0.5})
        async with Stack(spec) as st:
            status, ctype, body = await _curl_post(st.url + "/v1/completions", ["--data-binary", json.dumps({"model": MODEL, "prompt": "x"})])
            assert status == 504 and ctype.startswith("application/json"), (status, ctype, body)
            assert error_of(body)["code"] == "gateway_timeout"
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def _mtls_stack(fleet: SimFleet, pki: PKI, client: tuple[Path, Path] | None, ca: Path) -> StackSpec:
    _, cert, key = pki.write_server("extproc-scheduler")
    tls = SchedulerTls(ca=str(ca), cert=str(client[0]) if client else "", key=str(client[1]) if client else "", sni="localhost")
    return StackSpec(
        endpoints=fleet.endpoints, models=[MODEL],
        scheduler_args=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca_path)],
        envoy_args={"extproc_tls": tls},
    )  # fmt: skip


async def test_envoy_to_scheduler_over_mtls(fleet: SimFleet, tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    _, cert_pem, key_pem = pki.issue("envoy", server=False)
    client = (tmp_path / "envoy.pem", tmp_path / "envoy.key")
    client[0].write_bytes(cert_pem)
    client[1].write_bytes(key_pem)
    body = {"model": MODEL, "prompt": "over mutual TLS", "max_tokens": 2}
    async with Stack(_mtls_stack(fleet, pki, client, pki.ca_path)) as st, aiohttp.ClientSession() as s:
        status, headers, data = await post(s, st.url, "/v1/completions", body)
        assert status == 200, data
        assert headers["x-gateway-destination-endpoint-served"] in fleet.endpoints
    # Envoy without a client certificate: the scheduler refuses the handshake → fail-close JSON 500
    async with Stack(_mtls_stack(fleet, pki, None, pki.ca_path)) as st, aiohttp.ClientSession() as s:
        status, _, data = await post(s, st.url, "/v1/completions", body)
        assert status == 500 and error_of(data)["code"] == "gateway_error"
    # Envoy trusting another CA: it refuses the scheduler's certificate
    (tmp_path / "other").mkdir()
    other = PKI(tmp_path / "other")
    async with Stack(_mtls_stack(fleet, pki, client, other.ca_path)) as st, aiohttp.ClientSession() as s:
        status, _, data = await post(s, st.url, "/v1/completions", body)
        assert status == 500 and error_of(data)["code"] == "gateway_error"


async def _completions_total(s: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    async with s.get(metrics_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("extproc_request_completions_total{"):
            label, value = line.rsplit(" ", 1)
            out[label.split('outcome="', 1)[1].split('"', 1)[0]] = float(value)
    return out


async def test_reused_client_request_id_is_two_flights(fleet: SimFleet) -> None:
    """Two concurrent streamed requests sharing a client x-request-id (and one naming another flight's
    x-extproc-request-id) are accounted separately: both finish "ok", in-flight returns to 0."""
    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL])) as st, aiohttp.ClientSession() as s:
        assert st.metrics_url is not None
        hdrs = {"x-request-id": "client-chosen", "x-extproc-request-id": "client-chosen"}

        async def one(i: int) -> bytes:
            body = {"model": MODEL, "prompt": f"collision {i}", "max_tokens": 24, "stream": True}
            async with s.post(st.url + "/v1/completions", json=body, headers=hdrs) as r:
                assert r.status == 200
                return await r.read()

        outs = await asyncio.gather(*(one(i) for i in range(4)))
        assert all(b"[DONE]" in o for o in outs)
        assert await wait_until(lambda: _ok_is(s, st.metrics_url, 4), timeout_s=10)  # type: ignore[arg-type]
        totals = await _completions_total(s, st.metrics_url)
        assert totals.get("ok") == 4 and "superseded" not in totals, totals


async def _ok_is(s: aiohttp.ClientSession, url: str, n: int) -> bool:
    return (await _completions_total(s, url)).get("ok", 0) >= n


async def test_prompt_batch_and_embeddings_through_envoy(fleet: SimFleet) -> None:
    import openai

    async with Stack(StackSpec(endpoints=fleet.endpoints, models=[MODEL])) as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0)
        try:
            out = await client.completions.create(model=MODEL, prompt=["one prompt", "another prompt"], max_tokens=2)
            assert [c.index for c in out.choices] == [0, 1]
            emb = await client.embeddings.create(model=MODEL, input=["embed me", "and me"])
            assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
            raw = await client.embeddings.with_raw_response.create(model=MODEL, input="which pod?")
            assert raw.headers["x-gateway-destination-endpoint-served"] in fleet.endpoints
        finally:
            await client.close()
