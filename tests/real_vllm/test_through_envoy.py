"""(b) Real Envoy + extproc in front of two real vLLM pods: requests reach the pod the scheduler picked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from extproc.harness import Stack, StackSpec
from extproc.sim.calibrate import VllmServer
from extproc.sim.tiny_model import corpus

from .conftest import MODEL
from .helpers import metric, metrics_text, post_json, post_stream, sample_sum

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVED = "x-gateway-destination-endpoint-served"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(vllm_pods: list[VllmServer]) -> AsyncIterator[Stack]:
    kv = {
        p.address: {"endpoint": p.kv_endpoint, "replay_endpoint": p.kv_replay_endpoint, "topic": p.kv_topic}
        for p in vllm_pods
    }
    spec = StackSpec(endpoints=[p.address for p in vllm_pods], config="default", models=[MODEL], kv_events=kv)
    async with Stack(spec) as st:
        yield st


async def _scheduler_sees_pods(s: aiohttp.ClientSession, st: Stack, pods: list[VllmServer]) -> str:
    assert st.metrics_url is not None
    text = ""
    for _ in range(100):
        text = await metrics_text(s, st.metrics_url)
        if all(f'extproc_pod_healthy{{endpoint="{p.address}"}} 1.0' in text for p in pods):
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"scheduler never reported both pods healthy:\n{text[-3000:]}")


async def test_scheduler_scrapes_real_pods(stack: Stack, vllm_pods: list[VllmServer]) -> None:
    async with aiohttp.ClientSession() as s:
        text = await _scheduler_sees_pods(s, stack, vllm_pods)
    for p in vllm_pods:
        assert f'extproc_pod_kv_cache_usage{{endpoint="{p.address}"}}' in text
        assert f'extproc_pod_waiting_requests{{endpoint="{p.address}"}} 0.0' in text


@pytest.mark.parametrize("stream", [False, True])
async def test_request_lands_on_the_picked_pod(stack: Stack, vllm_pods: list[VllmServer], stream: bool) -> None:
    by_addr = {p.address: p for p in vllm_pods}
    prompt = [300 + i for i in range(37)]  # token ids: exactly 37 prompt tokens on whichever pod serves it
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "min_tokens": 3, "ignore_eos": True, "stream": stream}
    async with aiohttp.ClientSession() as s:
        await _scheduler_sees_pods(s, stack, vllm_pods)
        for _ in range(4):
            before = {a: await metric(s, p.url, "vllm:prompt_tokens_total") for a, p in by_addr.items()}
            if stream:
                status, headers, chunks = await post_stream(s, stack.url + "/v1/completions", body)
                assert any(c["choices"] for c in chunks)
            else:
                status, headers, resp = await post_json(s, stack.url + "/v1/completions", body)
                assert resp["usage"]["prompt_tokens"] == 37
            assert status == 200
            picked = headers.get(SERVED)
            assert picked in by_addr, headers
            after = {a: await metric(s, p.url, "vllm:prompt_tokens_total") for a, p in by_addr.items()}
            assert after[picked] - before[picked] == 37
            for other in by_addr.keys() - {picked}:
                assert after[other] == before[other]


async def test_chat_through_envoy(stack: Stack, vllm_pods: list[VllmServer]) -> None:
    async with aiohttp.ClientSession() as s:
        status, headers, body = await post_json(
            s,
            stack.url + "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "route me"}], "max_tokens": 3},
        )
    assert status == 200, body
    assert headers.get(SERVED) in {p.address for p in vllm_pods}
    assert body["choices"][0]["message"]["role"] == "assistant"


async def test_repeated_long_prefix_hits_the_cache_of_the_pod_it_lands_on(
    stack: Stack, vllm_pods: list[VllmServer]
) -> None:
    by_addr = {p.address: p for p in vllm_pods}
    # ~500 tokens of corpus text: three full 128-token blocks to reuse
    text = " ".join(corpus(seed=31337, sentences=60))
    first = {"model": MODEL, "prompt": text + " first question", "max_tokens": 2}
    second = {"model": MODEL, "prompt": text + " second question", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        await _scheduler_sees_pods(s, stack, vllm_pods)
        status, h1, r1 = await post_json(s, stack.url + "/v1/completions", first)
        assert status == 200, r1
        assert r1["usage"]["prompt_tokens"] >= 3 * 128 + 1
        pod1 = h1[SERVED]
        hits_before = {a: sample_sum(await metrics_text(s, p.url), "vllm:prefix_cache_hits_total") for a, p in by_addr.items()}
        await asyncio.sleep(0.3)  # let the scheduler's scrape / KV events see the first request's blocks
        status, h2, r2 = await post_json(s, stack.url + "/v1/completions", second)
        assert status == 200, r2
        pod2 = h2[SERVED]
        hits_after = {a: sample_sum(await metrics_text(s, p.url), "vllm:prefix_cache_hits_total") for a, p in by_addr.items()}
    assert pod2 == pod1, "the prefix-aware scheduler sent the repeated prefix to another pod"
    assert hits_after[pod2] - hits_before[pod2] >= 3 * 128
    for other in by_addr.keys() - {pod2}:
        assert hits_after[other] == hits_before[other]
