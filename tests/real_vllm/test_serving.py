"""(a) Two real vLLM pods answer completions and chat, streaming and not."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from tokenizers import Tokenizer

from extproc.sim.calibrate import VllmServer

from .conftest import MODEL
from .helpers import post_json, post_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("pod_index", [0, 1])
async def test_completions_non_streaming(vllm_pods: list[VllmServer], tiny_model_dir: Path, pod_index: int) -> None:
    pod = vllm_pods[pod_index]
    prompt = "the server routes the request"
    # vLLM tokenizes with our tokenizer.json, BOS included
    expected_ids = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode(prompt).ids
    async with aiohttp.ClientSession() as s:
        status, _, body = await post_json(
            s,
            pod.url + "/v1/completions",
            {"model": MODEL, "prompt": prompt, "max_tokens": 5, "min_tokens": 5, "ignore_eos": True},
        )
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens"] == len(expected_ids)
    assert isinstance(body["choices"][0]["text"], str)


@pytest.mark.parametrize("pod_index", [0, 1])
async def test_completions_streaming_with_usage(vllm_pods: list[VllmServer], pod_index: int) -> None:
    pod = vllm_pods[pod_index]
    async with aiohttp.ClientSession() as s:
        status, headers, chunks = await post_stream(
            s,
            pod.url + "/v1/completions",
            {
                "model": MODEL,
                "prompt": list(range(100, 140)),
                "max_tokens": 7,
                "min_tokens": 7,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    token_chunks = [c for c in chunks if c["choices"]]
    assert 1 <= len(token_chunks) <= 7
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47}


@pytest.mark.parametrize("pod_index", [0, 1])
async def test_chat_non_streaming(vllm_pods: list[VllmServer], pod_index: int) -> None:
    pod = vllm_pods[pod_index]
    async with aiohttp.ClientSession() as s:
        status, _, body = await post_json(
            s,
            pod.url + "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hello pod"}], "max_tokens": 4},
        )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 4
    # <s> <|im_start|> user \n hello pod <|im_end|> \n <|im_start|> assistant \n: the template was applied
    assert body["usage"]["prompt_tokens"] >= 8


@pytest.mark.parametrize("pod_index", [0, 1])
async def test_chat_streaming(vllm_pods: list[VllmServer], pod_index: int) -> None:
    pod = vllm_pods[pod_index]
    async with aiohttp.ClientSession() as s:
        status, _, chunks = await post_stream(
            s,
            pod.url + "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "explain the cache"}],
                "max_tokens": 6,
                "min_tokens": 6,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert status == 200
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finishes == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_models_and_health(vllm_pods: list[VllmServer]) -> None:
    async with aiohttp.ClientSession() as s:
        for pod in vllm_pods:
            async with s.get(pod.url + "/health") as r:
                assert r.status == 200
            async with s.get(pod.url + "/v1/models") as r:
                data = (await r.json())["data"]
            assert [m["id"] for m in data] == [MODEL]
            assert data[0]["max_model_len"] == 2048
    assert len({p.port for p in vllm_pods}) == 2
