"""Streaming responses pass through Envoy + ext_proc byte-identical, chunk boundaries and all."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from extproc.harness import Stack, StackSpec

pytestmark = pytest.mark.envoy

# awkward bytes on purpose: multi-byte UTF-8, an SSE comment, a split event, the usage chunk and [DONE]
CHUNKS = [
    b'data: {"id":"x","choices":[{"index":0,"text":"h\xc3\xa9llo"}]}\n\n',
    b": keep-alive comment\n\n",
    b'data: {"id":"x","choices":[{"index":0,"te',
    b'xt":" w\xe2\x82\xacrld"}]}\n\n',
    b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
    b"data: [DONE]\n\n",
]
METRICS = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="fixed"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="fixed"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="fixed"} 0.0
"""


async def upstream_app():
    async def completions(request):
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in CHUNKS:
            await resp.write(c)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def metrics(request):
        return web.Response(body=METRICS, content_type="text/plain")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "fixed", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("observe", ["observability", "streamed"])
async def test_stream_byte_identical(observe):
    runner, addr = await upstream_app()
    try:
        async with Stack(StackSpec(endpoints=[addr], models=["fixed"], response_observe=observe, in_process=True)) as st:
            async with aiohttp.ClientSession() as s:
                async with s.post(st.url + "/v1/completions", json={"model": "fixed", "prompt": "x", "stream": True}) as r:
                    assert r.status == 200
                    got = await r.read()
            assert got == b"".join(CHUNKS)
            for _ in range(100):
                if len(st.server.tracker) == 0:
                    break
                await asyncio.sleep(0.02)
            assert len(st.server.tracker) == 0
            text = st.server.metrics.exposition().decode()
            assert 'extproc_output_tokens_total{model="fixed"} 2.0' in text
    finally:
        await runner.cleanup()
