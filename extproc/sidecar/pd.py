"""The decode-side P/D sidecar: a reverse proxy in front of the decode vLLM that runs the prefill leg first.

Protocol (llm-d-router ``pkg/sidecar/proxy/connector_nixlv2.go``; vllm-project/router ``vllm_pd_router.rs``):

1. A request without ``x-prefiller-host-port`` goes to the local vLLM unchanged (every path and method; the
   response, streamed or not, is relayed byte for byte).
2. With the header (``ip:port``; a comma list takes the first), an inference POST (``/v1/completions``,
   ``/v1/chat/completions``, ``/v1/responses``) is first sent to that prefiller as a copy with ``stream: false``,
   no ``stream_options``, the API's token limit set to 1 (``max_tokens``; ``max_completion_tokens`` for chat;
   ``max_output_tokens`` for Responses) and ``kv_transfer_params = {do_remote_decode: true, do_remote_prefill:
   false, remote_engine_id: null, remote_block_ids: null, remote_host: null, remote_port: null}``.
3. The ``kv_transfer_params`` of the prefiller's JSON answer (vLLM NixlConnector: do_remote_prefill,
   remote_block_ids, remote_engine_id, remote_host, remote_port, ...) are put into the original request, which
   goes to the local decode vLLM; its answer streams back byte for byte. Both legs carry the same
   ``x-request-id``. The header itself never reaches a vLLM.

A failed prefill leg (decision, see docs/pd.md): a 4xx from the prefiller is returned to the client as is (the
request itself is bad; the decode pod would refuse it the same way). A 5xx, a connection failure or a timeout
means the *prefill pod* is in trouble, not the request: with ``on_prefill_failure="fallback"`` (default) the
decode vLLM prefills locally (the original request, without kv_transfer_params) and the response carries
``x-pd-fallback: local-prefill``; with ``"error"`` the client gets a 502 with an OpenAI JSON error. A prefiller
answer without ``kv_transfer_params`` (no KV connector there) also falls back to local prefill.

Response headers added on the P/D path: ``x-pd-prefill-endpoint`` (the prefiller used) and ``x-pd-prefill-ms``
(prefill-leg wall time), so the scheduler's observation stream can learn prefill-leg time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from extproc.netutil import HostPort, parse_host_port

log = logging.getLogger(__name__)

__all__ = ["PREFILL_HEADER", "SidecarSettings", "PDSidecar", "SidecarStats", "prefill_body", "TOKEN_LIMIT_FIELDS"]

PREFILL_HEADER = "x-prefiller-host-port"
HDR_FALLBACK = "x-pd-fallback"
HDR_PREFILL_ENDPOINT = "x-pd-prefill-endpoint"
HDR_PREFILL_MS = "x-pd-prefill-ms"

# API path suffix → the token-limit field set to 1 on the prefill leg
TOKEN_LIMIT_FIELDS: dict[str, str] = {
    "/chat/completions": "max_completion_tokens",
    "/completions": "max_tokens",
    "/responses": "max_output_tokens",
}
# RFC 7230 hop-by-hop headers, plus those aiohttp recomputes
_HOP = frozenset(
    (
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length",
    )
)  # fmt: skip
_RETRYABLE = (502, 503, 504)


def _token_field(path: str) -> str | None:
    p = path.split("?", 1)[0].rstrip("/")
    for suffix, fld in TOKEN_LIMIT_FIELDS.items():
        if p.endswith(suffix):
            return fld
    return None


def prefill_body(body: dict[str, Any], token_field: str) -> dict[str, Any]:
    """The prefill leg's request: stream off, token limit 1, kv_transfer_params asking for a remote decode."""
    out = dict(body)
    out["stream"] = False
    out.pop("stream_options", None)
    out[token_field] = 1
    if token_field == "max_completion_tokens" and "max_tokens" in out:
        out["max_tokens"] = 1  # vLLM takes max_completion_tokens first; keep both consistent
    if isinstance(out.get("min_tokens"), int) and out["min_tokens"] > 1:
        out["min_tokens"] = 1
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return out


def _error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


@dataclass(slots=True)
class SidecarSettings:
    on_prefill_failure: str = "fallback"  # fallback | error
    prefill_timeout_s: float = 300.0
    prefill_retries: int = 0  # extra tries of the prefill leg on 502/503/504 or a connection error
    retry_backoff_s: float = 0.05
    allow: tuple[str, ...] = ()  # allowed prefill targets: host:port, IP, or CIDR; empty = any
    max_body_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.on_prefill_failure not in ("fallback", "error"):
            raise ValueError("on_prefill_failure must be 'fallback' or 'error'")
        if self.prefill_timeout_s <= 0 or self.prefill_retries < 0:
            raise ValueError("prefill_timeout_s must be > 0 and prefill_retries >= 0")


@dataclass(slots=True)
class SidecarStats:
    passthrough: int = 0
    pd: int = 0
    prefill_ok: int = 0
    prefill_failed: int = 0
    fallback_local: int = 0
    rejected: int = 0
    legs: list[tuple[str, str, str]] = field(default_factory=list)  # (request id, leg, target), when recording

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("passthrough", "pd", "prefill_ok", "prefill_failed", "fallback_local", "rejected")}


class _Allow:
    """Prefill-target allowlist (SSRF guard, as the reference sidecar's InferencePool allowlist)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for e in entries:
            e = e.strip()
            if not e:
                continue
            if "/" in e:
                self.nets.append(ipaddress.ip_network(e, strict=False))
            else:
                self.exact.add(e)
        self.any = not self.exact and not self.nets

    def allowed(self, hp: HostPort) -> bool:
        if self.any or str(hp) in self.exact or hp.host in self.exact:
            return True
        try:
            ip = ipaddress.ip_address(hp.host)
        except ValueError:
            return False
        return any(ip in n for n in self.nets)


class PDSidecar:
    """One sidecar: ``listen`` → ``upstream`` (the decode vLLM). ``await start()`` / ``await stop()``."""

    def __init__(self, listen: HostPort, upstream: HostPort, settings: SidecarSettings | None = None, record_legs: bool = False) -> None:
        self.listen = listen
        self.upstream = upstream
        self.settings = settings or SidecarSettings()
        self.stats = SidecarStats()
        self.record_legs = record_legs
        self._allow = _Allow(self.settings.allow)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = listen.port

    @property
    def address(self) -> str:
        return str(HostPort(self.listen.host, self.port))

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen.host, self.listen.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])
        log.info("pd sidecar up", extra={"listen": self.address, "upstream": str(self.upstream)})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------------------------------------------
    def _forward_headers(self, request: web.Request, request_id: str | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in request.headers.items():
            kl = k.lower()
            if kl in _HOP or kl == PREFILL_HEADER:
                continue
            out[k] = v
        if request_id is not None:
            out = {k: v for k, v in out.items() if k.lower() != "x-request-id"}
            out["x-request-id"] = request_id
        return out

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_targets = request.headers.getall(PREFILL_HEADER, [])
        token_field = _token_field(request.path) if request.method == "POST" else None
        targets = [t.strip() for v in raw_targets for t in v.split(",") if t.strip()]
        if not targets or token_field is None:
            self.stats.passthrough += 1
            body = await request.read()
            return await self._relay(request, self.upstream, body, self._forward_headers(request))
        try:
            target = parse_host_port(targets[0])
        except ValueError as e:
            self.stats.rejected += 1
            return _error(400, f"bad {PREFILL_HEADER} header: {e}", "invalid_request_error", "bad_prefill_header")
        if not self._allow.allowed(target):
            self.stats.rejected += 1
            log.warning("prefill target not allowed", extra={"target": str(target)})
            return _error(403, f"prefill target {target} is not allowed", "permission_error", "prefill_not_allowed")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            self.stats.rejected += 1
            return _error(400, f"request body is not valid JSON: {e}", "invalid_request_error", "invalid_json")
        if not isinstance(body, dict):
            self.stats.rejected += 1
            return _error(400, "request body must be a JSON object", "invalid_request_error", "invalid_json")
        return await self._pd(request, target, body, raw, token_field)

    async def _pd(self, request: web.Request, target: HostPort, body: dict[str, Any], raw: bytes, token_field: str) -> web.StreamResponse:
        self.stats.pd += 1
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = self._forward_headers(request, rid)
        headers["content-type"] = "application/json"
        pbody = json.dumps(prefill_body(body, token_field), separators=(",", ":"), ensure_ascii=False).encode()
        url = f"http://{target}{request.path_qs}"
        t0 = time.perf_counter()
        status, pdata, perr = await self._prefill(url, pbody, headers)
        prefill_ms = (time.perf_counter() - t0) * 1000.0
        if self.record_legs:
            self.stats.legs.append((rid, "prefill", str(target)))
        extra = {HDR_PREFILL_ENDPOINT: str(target), HDR_PREFILL_MS: f"{prefill_ms:.3f}"}
        kvp: Any = None
        if perr is None and 200 <= status < 300:
            try:
                kvp = json.loads(pdata).get("kv_transfer_params")
            except (ValueError, AttributeError):
                kvp = None
            if isinstance(kvp, dict):
                self.stats.prefill_ok += 1
            else:
                kvp = None
                self.stats.fallback_local += 1
                extra[HDR_FALLBACK] = "no-kv-transfer-params"
                log.warning("prefiller answered without kv_transfer_params; decoding with local prefill", extra={"target": str(target), "request_id": rid})
        elif perr is None and 400 <= status < 500:
            self.stats.prefill_failed += 1
            return web.Response(status=status, body=pdata, content_type="application/json", headers=extra)
        else:
            self.stats.prefill_failed += 1
            why = perr or f"status {status}"
            log.warning("prefill leg failed", extra={"target": str(target), "request_id": rid, "reason": why})
            if self.settings.on_prefill_failure == "error":
                return _error(502, f"prefill on {target} failed: {why}", "service_unavailable", "prefill_failed", extra)
            self.stats.fallback_local += 1
            extra[HDR_FALLBACK] = "local-prefill"
        if kvp is not None:
            dbody = dict(body)
            dbody["kv_transfer_params"] = kvp
            draw = json.dumps(dbody, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            draw = raw
        if self.record_legs:
            self.stats.legs.append((rid, "decode", str(self.upstream)))
        return await self._relay(request, self.upstream, draw, headers, extra)

    async def _prefill(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
        assert self._session is not None
        s = self.settings
        attempt = 0
        while True:
            try:
                async with self._session.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=s.prefill_timeout_s)) as r:
                    data = await r.read()
                    if r.status in _RETRYABLE and attempt < s.prefill_retries:
                        attempt += 1
                        await asyncio.sleep(s.retry_backoff_s)
                        continue
                    return r.status, data, None
            except asyncio.TimeoutError:
                err = f"timeout after {s.prefill_timeout_s:g} s"
            except aiohttp.ClientError as e:
                err = f"{type(e).__name__}: {e}"
            if attempt >= s.prefill_retries:
                return 0, b"", err
            attempt += 1
            await asyncio.sleep(s.retry_backoff_s)

    async def _relay(
        self, request: web.Request, upstream: HostPort, body: bytes, headers: dict[str, str], extra: dict[str, str] | None = None
    ) -> web.StreamResponse:
        """Send to ``upstream`` and relay its answer, chunk by chunk, byte for byte."""
        assert self._session is not None
        url = f"http://{upstream}{request.path_qs}"
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(request.method, url, data=body if body else None, headers=headers, allow_redirects=False) as r:
                resp = web.StreamResponse(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in _HOP:
                        resp.headers.add(k, v)
                if r.headers.get("content-length") is not None and "chunked" not in r.headers.get("transfer-encoding", ""):
                    resp.content_length = int(r.headers["content-length"])
                for k, v in (extra or {}).items():
                    resp.headers[k] = v
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
            if resp is not None and resp.prepared:
                # the upstream died mid-response: cut the client's connection too (no silent truncation)
                if request.transport is not None:
                    request.transport.close()
                return resp
            return _error(502, f"decode upstream {upstream} failed: {type(e).__name__}", "service_unavailable", "upstream_failed", extra)
