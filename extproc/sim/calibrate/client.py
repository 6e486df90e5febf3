"""The calibration HTTP client: streams the designed requests to a server (real or simulated) and records send,
first-token and end times; reads the server's facts (``vllm:cache_config_info``, ``/v1/models``) and its
prefix-cache hit counter."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extproc.sim.calibrate.design import CalRequest, Sample, Wave, _Rng
from extproc.sse import DONE, data_payloads

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)


async def send_one(session: aiohttp.ClientSession, base_url: str, model: str, req: CalRequest) -> Sample:
    """Stream one completion; the first chunk carrying a token marks the first-token time."""
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "min_tokens": req.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    t_send = time.perf_counter()
    t_first = 0.0
    first_tokens = 1
    chunks = 0
    usage: dict[str, Any] = {}
    async with session.post(base_url.rstrip("/") + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base_url}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for data in data_payloads(resp.content.iter_any()):
            if data == DONE:
                break
            chunk = json.loads(data)
            for ch in chunk.get("choices") or ():
                if ch.get("text") or ch.get("token_ids"):
                    chunks += 1
                    if not t_first:
                        t_first = time.perf_counter()
                        first_tokens = len(ch.get("token_ids") or ()) or 1
                    break
            if chunk.get("usage"):
                usage = chunk["usage"]
    t_end = time.perf_counter()
    if not t_first:
        raise RuntimeError(f"{base_url}: request {req.key} streamed no token")
    return Sample(
        req,
        t_send,
        t_first,
        t_end,
        int(usage.get("prompt_tokens", len(req.prompt))),
        int(usage.get("completion_tokens", req.max_tokens)),
        first_tokens,
        chunks,
    )


async def run_wave(session: aiohttp.ClientSession, base_url: str, model: str, wave: Wave) -> list[Sample]:
    async def lane(reqs: list[CalRequest]) -> list[Sample]:
        return [await send_one(session, base_url, model, r) for r in reqs]

    results = await asyncio.gather(*(lane(lr) for lr in wave.lanes))
    return [s for lane_samples in results for s in lane_samples]


async def run_design(base_url: str, model: str, waves: Sequence[Wave]) -> list[list[Sample]]:
    """Run each wave in turn (one warm-up request first); returns the samples per wave."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        warm = _Rng(99).tokens(64)
        for _ in range(2):
            await send_one(session, base_url, model, CalRequest("warmup", "warmup", warm + _Rng(98).tokens(8), 4, 0))
        out: list[list[Sample]] = []
        for w in waves:
            t0 = time.perf_counter()
            out.append(await run_wave(session, base_url, model, w))
            logger.info("%s: wave %s, %d requests in %.1f s", base_url, w.name, len(out[-1]), time.perf_counter() - t0)
        return out


@dataclass(slots=True)
class ServerFacts:
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    model: str


async def server_facts(base_url: str, model: str | None) -> ServerFacts:
    """``block_size``/``num_gpu_blocks`` from ``vllm:cache_config_info``, model and ``max_model_len`` from
    ``/v1/models``."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(base_url.rstrip("/") + "/metrics") as resp:
            resp.raise_for_status()
            text = await resp.text()
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            models = (await resp.json()).get("data") or []
    labels: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:cache_config_info":
            for sample in fam.samples:
                labels = dict(sample.labels)
                break
    if not labels:
        raise RuntimeError(f"{base_url}/metrics has no vllm:cache_config_info")
    card = next((m for m in models if model is None or m.get("id") == model), None)
    if card is None:
        raise RuntimeError(f"{base_url}/v1/models does not serve {model!r}")
    return ServerFacts(
        block_size=int(labels["block_size"]),
        num_gpu_blocks=int(labels["num_gpu_blocks"]),
        max_model_len=int(card.get("max_model_len") or 2048),
        model=str(card["id"]),
    )


async def _prefix_hits(base_url: str) -> float:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(base_url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:prefix_cache_hits":
            total += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return total
