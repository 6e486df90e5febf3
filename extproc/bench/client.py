"""Open-loop aiohttp streaming client: replays a workload trace against one URL.

Each request is sent at its trace arrival time (never waiting for earlier ones: open loop, like inference-perf and
``vllm bench serve``). TTFT is the time to the first SSE chunk that carries content; E2E is the time to the end
of the stream; output tokens come from the ``usage`` chunk (``stream_options.include_usage``), falling back to the
number of content chunks when a proxy drops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from collections.abc import Callable, Sequence

import aiohttp

from extproc.bench.report import RequestResult
from extproc.bench.workloads import WorkloadRequest
from extproc.sse import DONE, data_payloads

log = logging.getLogger(__name__)

POD_HEADERS = ("x-inference-pod", "x-gateway-destination-endpoint-served")
PREFILL_POD_HEADER = "x-pd-prefill-endpoint"  # set by extproc pd-sidecar on a split request
PREFILL_MS_HEADER = "x-pd-prefill-ms"  # the sidecar's prefill-leg time


def _prefill_ms(headers: Any) -> float:
    try:
        return float(headers.get(PREFILL_MS_HEADER, -1.0))
    except ValueError:
        return -1.0


def _content_of(chunk: dict) -> str:  # type: ignore[type-arg]
    choices = chunk.get("choices") or ()
    for c in choices:
        t = c.get("text")
        if t:
            return str(t)
        d = c.get("delta") or {}
        t = d.get("content") or d.get("reasoning_content")
        if t:
            return str(t)
    return ""


async def _send_plain(session: aiohttp.ClientSession, url: str, req: WorkloadRequest, res: RequestResult,
                      start: float, timeout_s: float) -> RequestResult:
    """A non-streaming request: the first byte is the whole response, so TTFT = E2E; tokens from ``usage``."""
    async with session.post(
        url + req.path, data=req.body_bytes(stream=False), headers=req.headers(), timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as resp:
        res.status = resp.status
        for h in POD_HEADERS:
            if h in resp.headers:
                res.pod = resp.headers[h]
                break
        res.prefill_pod = resp.headers.get(PREFILL_POD_HEADER, "")
        res.prefill_ms = _prefill_ms(resp.headers)
        raw = await resp.read()
        res.e2e_ms = res.ttft_ms = (time.perf_counter() - start) * 1000.0
        if resp.status != 200:
            res.error = f"http {resp.status}: {raw[:200].decode('utf-8', 'replace')}"
            return res
        try:
            body = json.loads(raw)
        except ValueError:
            res.error = "response is not JSON"
            return res
        res.output_tokens = int((body.get("usage") or {}).get("completion_tokens") or 0)
        res.ok = bool(body.get("choices"))
        if not res.ok:
            res.error = "no choices in the response"
    return res


async def send_one(
    session: aiohttp.ClientSession, url: str, req: WorkloadRequest, t0: float, timeout_s: float = 600.0, stream: bool = True
) -> RequestResult:
    """Send one request (streaming unless ``stream`` is False); ``t0`` is the run start (time.perf_counter())."""
    if not stream:
        start = time.perf_counter()
        res = RequestResult(index=req.index, stage=req.stage, start=start - t0, ok=False)
        try:
            return await _send_plain(session, url, req, res, start, timeout_s)
        except asyncio.TimeoutError:
            res.error = "timeout"
        except aiohttp.ClientError as e:
            res.error = f"{type(e).__name__}: {e}"[:200]
        res.e2e_ms = (time.perf_counter() - start) * 1000.0
        return res
    body = req.body_bytes(stream=True)
    start = time.perf_counter()
    res = RequestResult(index=req.index, stage=req.stage, start=start - t0, ok=False)
    first = 0.0
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(
            url + req.path, data=body, headers=req.headers(), timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            res.status = resp.status
            for h in POD_HEADERS:
                if h in resp.headers:
                    res.pod = resp.headers[h]
                    break
            res.prefill_pod = resp.headers.get(PREFILL_POD_HEADER, "")
            res.prefill_ms = _prefill_ms(resp.headers)
            if resp.status != 200:
                text = await resp.text()
                res.error = f"http {resp.status}: {text[:200]}"
                res.e2e_ms = (time.perf_counter() - start) * 1000.0
                return res
            done = False
            async for payload in data_payloads(resp.content.iter_any()):
                if payload == DONE:
                    done = True
                    continue
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                if "error" in chunk and not chunk.get("choices"):
                    res.error = f"stream error: {str(chunk['error'])[:200]}"
                    continue
                if _content_of(chunk):
                    chunks += 1
                    if not first:
                        first = time.perf_counter()
                u = chunk.get("usage")
                if u and u.get("completion_tokens") is not None:
                    usage_tokens = int(u["completion_tokens"])
            end = time.perf_counter()
            res.e2e_ms = (end - start) * 1000.0
            res.ttft_ms = ((first or end) - start) * 1000.0
            res.output_tokens = usage_tokens if usage_tokens is not None else chunks
            if res.error:
                return res
            if not done:
                res.error = "stream ended without [DONE]"
                return res
            res.ok = first > 0.0
            if not res.ok:
                res.error = "no content in the stream"
    except asyncio.TimeoutError:
        res.error = "timeout"
        res.e2e_ms = (time.perf_counter() - start) * 1000.0
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        res.e2e_ms = (time.perf_counter() - start) * 1000.0
    return res


async def replay(
    url: str,
    requests: Sequence[WorkloadRequest],
    *,
    time_offset: float = 0.0,
    on_done: Callable[[RequestResult], None] | None = None,
    timeout_s: float = 600.0,
    stream: bool = True,
) -> list[RequestResult]:
    """Replay ``requests`` open loop. ``time_offset`` is subtracted from arrivals (to start a later stage now).
    Results are in request order; their ``start`` is relative to this call's start + ``time_offset``."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
    results: list[RequestResult | None] = [None] * len(requests)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        t0 = time.perf_counter() - time_offset

        async def one(i: int, r: WorkloadRequest) -> None:
            delay = r.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            rr = await send_one(session, url, r, t0, timeout_s, stream=stream)
            results[i] = rr
            if on_done is not None:
                on_done(rr)

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return [r for r in results if r is not None]
