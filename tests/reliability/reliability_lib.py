"""Shared helpers for the reliability tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.sim.fleet import FleetSpec, SimFleet

MODEL = "sim-llama"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(FleetSpec(pods=3, profile="llama3-8b-h100", model=MODEL, time_scale=0.05, seed=1)) as f:
        yield f


async def post(
    session: aiohttp.ClientSession, url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON body (or raw bytes) and read the whole answer; a transport error becomes status 0."""
    kw: dict[str, Any] = {"data": body, "headers": {"content-type": "application/json", **(headers or {})}} if isinstance(body, bytes) else {"json": body, "headers": headers or {}}
    try:
        async with session.post(url + path, **kw) as r:
            return r.status, dict(r.headers), await r.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        return 0, {}, repr(e).encode()


def error_of(data: bytes) -> dict[str, Any]:
    """The OpenAI-style error object of a JSON error body (asserts its shape)."""
    err = json.loads(data)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    return err


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, step_s: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout_s`` passes; returns the last value (generous bounds only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(step_s)


class Trap:
    """An HTTP server that records every request it receives (it must receive none)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "Trap":
        async def trap(request: web.Request) -> web.Response:
            self.hits.append(f"{request.method} {request.path}")
            return web.Response(text="trapped")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", trap)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class PKI:
    """A throwaway CA issuing server (127.0.0.1 / localhost) and client certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extproc-test-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.ca_path = root / "ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool) -> tuple[x509.Certificate, bytes, bytes]:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return cert, cert.public_bytes(serialization.Encoding.PEM), key_pem

    def write_server(self, cn: str) -> tuple[x509.Certificate, Path, Path]:
        cert, cert_pem, key_pem = self.issue(cn, server=True)
        cp, kp = self.root / "server.pem", self.root / "server.key"
        tmp_c, tmp_k = self.root / "server.pem.tmp", self.root / "server.key.tmp"
        tmp_c.write_bytes(cert_pem)
        tmp_k.write_bytes(key_pem)
        os.replace(tmp_k, kp)
        os.replace(tmp_c, cp)
        return cert, cp, kp
