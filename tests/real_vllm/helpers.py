"""Small HTTP helpers for the real-vLLM tests."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from extproc.sse import DONE, data_payloads


async def metrics_text(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(base_url.rstrip("/") + "/metrics") as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


def family_names(text: str) -> set[str]:
    """Names of the samples in a Prometheus exposition (counters keep their ``_total`` sample name)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            names.add(s.name)
    return names


def sample_sum(text: str, name: str) -> float:
    """Sum of every sample called ``name`` (across label sets)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


async def metric(session: aiohttp.ClientSession, base_url: str, name: str) -> float:
    return sample_sum(await metrics_text(session, base_url), name)


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, CIMultiDict[str], dict[str, Any]]:
    async with session.post(url, json=body) as resp:
        return resp.status, resp.headers.copy(), await resp.json(content_type=None)


async def post_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, CIMultiDict[str], list[dict[str, Any]]]:
    """POST a streaming request; returns the decoded ``data:`` chunks (``[DONE]`` checked and dropped)."""
    chunks: list[dict[str, Any]] = []
    done = False
    async with session.post(url, json=body) as resp:
        status, headers = resp.status, resp.headers.copy()
        async for data in data_payloads(resp.content.iter_any()):
            if data == DONE:
                done = True
                break
            chunks.append(json.loads(data))
    if status == 200:
        assert done, "stream ended without [DONE]"
    return status, headers, chunks
