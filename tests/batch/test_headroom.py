"""The scheduler's free batch slots reach the batch dispatcher through real Envoy (``x-gateway-batch-headroom``):
set by extproc on batch-band requests only, echoed on the response by Envoy, a client's copy never passes."""

from __future__ import annotations

import json

import aiohttp
from openai import AsyncOpenAI

from tests.batch.helpers import MODEL, gateway, metric_sum, wait_status
from tests.batch.helpers import jsonl as make_jsonl

HDR = "x-gateway-batch-headroom"


async def _post(s: aiohttp.ClientSession, url: str, objective: str) -> tuple[int, str | None]:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2})
    headers = {"content-type": "application/json", "x-gateway-inference-objective": objective, HDR: "999"}  # a spoofed copy
    async with s.post(url + "/v1/completions", data=body, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get(HDR)


async def test_headroom_header_on_batch_answers_only_and_the_dispatcher_uses_it() -> None:
    async with gateway(pods=2, start_batch=False) as gw:
        async with aiohttp.ClientSession() as s:
            # batch-interactive: batch may fill a pod up to 6 in flight, and 1 pod is kept free of batch
            # (batch-reserve-filter); an idle fleet of 2 pods, this request admitted → 1 × 6 − 1 free
            status, h = await _post(s, gw.url, "batch")
            assert status == 200 and h == "5"
            status, h = await _post(s, gw.url, "interactive")
            assert status == 200 and h is None  # not the batch band: no header, and the client's copy is gone
        gw.batch = await gw.start_batch("--lease", "2")
        client = AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
        f = await client.files.create(file=("in.jsonl", make_jsonl(60)), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
        b = await wait_status(client, b.id)
        assert b.status == "completed" and b.request_counts.completed == 60
        assert await metric_sum(gw.batch.url, "extproc_batch_dispatch_headroom_updates_total") >= 1
        await client.close()
