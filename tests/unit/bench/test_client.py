"""The streaming client against a local SSE server: TTFT, usage tokens, errors."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from extproc.bench.client import replay
from extproc.bench.workloads import Stage, generate


async def _server(fail_every: int = 0, extra_headers: dict[str, str] | None = None) -> tuple[web.AppRunner, str]:
    seen = {"n": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen["n"] += 1
        if fail_every and seen["n"] % fail_every == 0:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-inference-pod": "pod-1", **(extra_headers or {})})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.001)
            await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}).encode() + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": body["max_tokens"]}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_replay_measures_stream() -> None:
    runner, url = await _server()
    try:
        reqs = generate("shared-prefix", [Stage(50.0, 0.3)], seed=0).requests
        res = await replay(url, reqs)
    finally:
        await runner.cleanup()
    assert len(res) == len(reqs) > 0
    for r, w in zip(res, reqs):
        assert r.ok, r.error
        assert r.output_tokens == w.max_tokens
        assert r.pod == "pod-1"
        assert 0 < r.ttft_ms <= r.e2e_ms
        assert r.tpot_ms > 0


async def test_replay_reports_http_errors() -> None:
    runner, url = await _server(fail_every=2)
    try:
        reqs = generate("multi-turn", [Stage(50.0, 0.3)], seed=0).requests
        res = await replay(url, reqs)
    finally:
        await runner.cleanup()
    failed = [r for r in res if not r.ok]
    assert failed and all(r.status == 503 and "busy" in r.error for r in failed)
    assert any(r.ok for r in res)


async def test_replay_connection_refused() -> None:
    reqs = generate("shared-prefix", [Stage(20.0, 0.2)], seed=0).requests
    res = await replay("http://127.0.0.1:9", reqs)
    assert res and all(not r.ok and r.error for r in res)


async def test_replay_reads_the_sidecars_prefill_leg_time() -> None:
    from extproc.bench.report import summarize_stage

    runner, url = await _server(extra_headers={"x-pd-prefill-endpoint": "10.0.0.9:8000", "x-pd-prefill-ms": "42.500"})
    try:
        reqs = generate("shared-prefix", [Stage(50.0, 0.3)], seed=0).requests
        res = await replay(url, reqs)
    finally:
        await runner.cleanup()
    assert res and all(r.ok and r.prefill_pod == "10.0.0.9:8000" and r.prefill_ms == 42.5 for r in res)
    s = summarize_stage(res, stage=0, offered_rate=50.0, stage_start=0.0, stage_duration=0.3)
    assert s["prefill_split"] == len(res)
    assert s["prefill_leg_ms"]["p50"] == 42.5
    assert abs(s["ttft_after_prefill_ms"]["p50"] - (s["ttft_ms"]["p50"] - 42.5)) < 1e-6


async def test_no_prefill_leg_fields_without_the_header() -> None:
    from extproc.bench.report import summarize_stage

    runner, url = await _server()
    try:
        res = await replay(url, generate("shared-prefix", [Stage(50.0, 0.2)], seed=0).requests)
    finally:
        await runner.cleanup()
    assert res and all(r.prefill_ms == -1.0 for r in res)
    s = summarize_stage(res, stage=0, offered_rate=50.0, stage_start=0.0, stage_duration=0.2)
    assert "prefill_leg_ms" not in s and "ttft_after_prefill_ms" not in s
