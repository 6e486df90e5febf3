from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from extproc.sim.fleet import FleetSpec, SimFleet

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    spec = FleetSpec(pods=2, profile="tiny-cpu", model="sim", loras=("a", "b"), kv_events=True, time_scale=0.05)
    async with SimFleet(spec) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _events(raw: bytes) -> list[dict]:
    out = []
    for line in raw.decode().split("\n\n"):
        if line.startswith("data: "):
            out.append(line[6:])
    return out


async def test_streaming_completion_shape(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[0]
    body = {"model": "sim", "prompt": "hello there world", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(f"http://{ep}/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["x-inference-pod"] == ep
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    data = _events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 5
    assert all(c["object"] == "text_completion" and c["model"] == "sim" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 4 + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5


async def test_streaming_chat_without_usage(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[1]
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with http.post(f"http://{ep}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        data = _events(await r.read())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(content) == 3 and chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_non_streaming_usage_and_determinism(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[0]
    body = {"model": "sim", "prompt": "same prompt", "max_tokens": 4}
    texts = []
    for _ in range(2):
        async with http.post(f"http://{ep}/v1/completions", json=body) as r:
            assert r.status == 200
            out = await r.json()
        assert out["object"] == "text_completion"
        assert out["usage"]["completion_tokens"] == 4
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 4
        texts.append(out["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]
    async with http.post(f"http://{ep}/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}) as r:
        out = await r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 2


async def test_errors(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[0]
    async with http.post(f"http://{ep}/v1/completions", data=b"{not json") as r:
        assert r.status == 400 and r.headers["x-inference-pod"] == ep
        assert (await r.json())["error"]["type"] == "BadRequestError"
    async with http.post(f"http://{ep}/v1/completions", json={"model": "sim"}) as r:
        assert r.status == 400
    async with http.post(f"http://{ep}/v1/chat/completions", json={"model": "sim"}) as r:
        assert r.status == 400
    async with http.post(f"http://{ep}/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
        assert r.status == 404
        err = (await r.json())["error"]
        assert err["message"] == "The model `nope` does not exist." and err["code"] == 404
    async with http.post(f"http://{ep}/v1/completions", json={"prompt": "x " * 3000, "max_tokens": 4}) as r:
        assert r.status == 400 and "maximum context length" in (await r.json())["error"]["message"]


async def test_models_tokenize_and_peer_probes(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[0]
    async with http.get(f"http://{ep}/v1/models") as r:
        models = (await r.json())["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("sim", None), ("a", "sim"), ("b", "sim")]
    async with http.post(f"http://{ep}/tokenize", json={"model": "sim", "prompt": "hello world"}) as r:
        tok = await r.json()
    assert tok["count"] == len(tok["tokens"]) > 0
    async with http.post(f"http://{ep}/detokenize", json={"model": "sim", "tokens": tok["tokens"][1:]}) as r:
        assert (await r.json())["prompt"] == "hello world"
    async with http.post(f"http://{ep}/v1/completions/render", json={"model": "sim", "prompt": "hello world"}) as r:
        assert (await r.json())["token_ids"] == tok["tokens"]
    for path in ("/health", "/get_model_info", "/get_server_info", "/get_load"):
        async with http.get(f"http://{ep}{path}") as r:
            assert r.status == 200 and r.headers["x-inference-pod"] == ep


async def test_metrics_names_types_labels(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    ep = fleet.endpoints[0]
    async with http.post(f"http://{ep}/v1/completions", json={"model": "a", "prompt": "p " * 300, "max_tokens": 3}):
        pass
    async with http.get(f"http://{ep}/metrics") as r:
        assert r.status == 200 and r.headers["x-inference-pod"] == ep
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    expect = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter", "vllm:prompt_tokens_cached": "counter",
        "vllm:cache_config_info": "gauge", "vllm:lora_requests_info": "gauge",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram", "vllm:request_success": "counter",
        "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    }
    for name, typ in expect.items():
        assert fams[name].type == typ, name
    s = fams["vllm:generation_tokens"].samples[0]
    assert s.labels == {"model_name": "sim", "engine": "0"} and s.value == 3
    succ = {x.labels["finished_reason"]: x.value for x in fams["vllm:request_success"].samples}
    assert succ["length"] == 1
    cache = fams["vllm:cache_config_info"].samples[0].labels
    assert cache["block_size"] == "128" and cache["num_gpu_blocks"] == "8192"
    lora = fams["vllm:lora_requests_info"].samples[0].labels
    assert lora["max_lora"] == "1" and lora["running_lora_adapters"] == ""
    ttft_count = [x for x in fams["vllm:time_to_first_token_seconds"].samples if x.name.endswith("_count")]
    assert ttft_count[0].value == 1
    assert fams["vllm:prompt_tokens"].samples[0].value > 300


async def test_faults(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    pod = fleet.pods[0]
    ep = pod.address
    url = f"http://{ep}/v1/completions"
    pod.set_faults(error_rate=1.0)
    async with http.post(url, json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 500 and (await r.json())["error"]["code"] == 500
    pod.set_faults(metrics_fail=True)
    async with http.get(f"http://{ep}/metrics") as r:
        assert r.status == 500
    pod.set_faults(die_mid_stream=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(url, json={"prompt": "x", "max_tokens": 20, "stream": True}) as r:
            await r.read()
    async with http.post(url, json={"prompt": "x", "max_tokens": 4, "stream": True}) as r:
        assert _events(await r.read())[-1] == "[DONE]"  # one-shot
    assert pod.engine.kv.num_free_blocks == pod.profile.num_gpu_blocks
    pod.set_faults(hang=True)
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(f"http://{ep}/health", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    pod.set_faults(slow_factor=4.0)
    assert pod.engine.slowdown == 4.0
    async with http.get(f"http://{ep}/health") as r:
        assert r.status == 200


async def test_client_disconnect_aborts(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    pod = fleet.pods[1]
    async with http.post(f"http://{pod.address}/v1/completions",
                         json={"prompt": "y " * 200, "max_tokens": 1000, "stream": True}) as r:
        await r.content.readline()
    for _ in range(200):
        if not pod.engine.has_work():
            break
        await asyncio.sleep(0.01)
    assert not pod.engine.has_work()
    assert pod.engine.kv.num_free_blocks == pod.profile.num_gpu_blocks
    assert pod.engine.stats.finished_reasons.get("abort") == 1


async def test_kill_and_restart_same_port(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    pod = fleet.pods[0]
    addr = pod.address
    await pod.kill()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"http://{addr}/health"):
            pass
    await pod.restart()
    assert pod.address == addr
    async with http.get(f"http://{addr}/health") as r:
        assert r.status == 200


async def test_kv_events_over_zmq(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    pod = fleet.pods[0]
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pod.kv_events_endpoint)
    try:
        await asyncio.sleep(0.3)  # slow joiner
        prompt = " ".join(f"w{i}" for i in range(400))
        async with http.post(f"http://{pod.address}/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
            assert r.status == 200
        topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert topic.decode() == pod.topic == f"kv@{pod.address}@sim"
        assert len(seq) == 8
        ts, events, dp_rank = msgpack.unpackb(payload)
        assert dp_rank == 0 and isinstance(ts, float)
        ev = events[0]
        assert ev["type"] == "BlockStored" and ev["medium"] == "GPU" and ev["block_size"] == 128
        assert ev["group_idx"] == 0 and ev["kv_cache_spec_kind"] == "full_attention"
        assert len(ev["token_ids"]) == 128 * len(ev["block_hashes"])
        # replay from sequence 0 returns the same batch, then the end marker
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pod.replay_endpoint)
        try:
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            got = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                # vLLM 0.32 replay shape: [b"", topic, seq, payload]; end marker [b"", b"", -1, b""]
                assert len(frames) == 4 and frames[0] == b""
                if int.from_bytes(frames[2], "big", signed=True) == -1:
                    assert frames[1] == b""
                    break
                assert frames[1] == pod.topic.encode()
                got.append(frames[3])
            assert got[0] == payload
        finally:
            dealer.close(linger=0)
    finally:
        sub.close(linger=0)
        ctx.term()


async def test_heterogeneous_fleet_labels() -> None:
    spec = FleetSpec(fleet="llama3-8b-h100:2,llama3-8b-l40s:1", kv_blocks=64, time_scale=0.01)
    async with SimFleet(spec) as f:
        assert len(f.endpoints) == 3
        assert sorted(v["accelerator"] for v in f.labels.values()) == ["H100-SXM-80GB"] * 2 + ["L40S-48GB"]
        assert all(p.profile.num_gpu_blocks == 64 for p in f.pods)


async def test_completions_prompt_batch_and_embeddings_with_the_openai_client(fleet: SimFleet) -> None:
    """vLLM accepts a list of prompts (one choice per prompt, usage summed) and serves /v1/embeddings; so does
    the simulator, as the official client sees it."""
    import openai

    ep = fleet.endpoints[0]
    client = openai.AsyncOpenAI(base_url=f"http://{ep}/v1", api_key="unused", max_retries=0)
    try:
        single = await client.completions.create(model="sim", prompt="first prompt", max_tokens=3)
        out = await client.completions.create(model="sim", prompt=["first prompt", "a second, longer prompt"], max_tokens=3)
        assert [c.index for c in out.choices] == [0, 1]
        assert out.choices[0].text == single.choices[0].text  # same prompt, same deterministic text
        assert out.usage is not None and out.usage.completion_tokens == 6
        assert out.usage.prompt_tokens > single.usage.prompt_tokens  # type: ignore[union-attr]
        ids = await client.completions.create(model="sim", prompt=[[1, 2, 3], [4, 5, 6, 7]], max_tokens=2)
        assert len(ids.choices) == 2 and ids.usage is not None and ids.usage.prompt_tokens == 7
        stream = await client.completions.create(
            model="sim", prompt=["one", "two", "three"], max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        per_index: dict[int, int] = {}
        usage = None
        async for chunk in stream:
            for c in chunk.choices:
                per_index[c.index] = per_index.get(c.index, 0) + 1
            usage = chunk.usage or usage
        assert per_index == {0: 4, 1: 4, 2: 4} and usage is not None and usage.completion_tokens == 12

        emb = await client.embeddings.create(model="sim", input=["hello world", "something else", "hello world"])
        vecs = [d.embedding for d in emb.data]
        assert [d.index for d in emb.data] == [0, 1, 2] and all(len(v) == 64 for v in vecs)
        assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
        assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-6
        assert emb.usage.prompt_tokens > 0 and emb.usage.total_tokens == emb.usage.prompt_tokens
        b64 = await client.embeddings.create(model="sim", input="hello world", dimensions=8)  # the client asks for base64
        assert len(b64.data[0].embedding) == 8
        one = await client.embeddings.create(model="sim", input=[5, 6, 7], encoding_format="float")
        assert len(one.data) == 1
        for bad in ({"input": []}, {"input": [1, "x"]}, {"input": "x", "dimensions": 0}, {"input": "x", "encoding_format": "hex"}):
            with pytest.raises(openai.BadRequestError):
                await client.embeddings.create(model="sim", **bad)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="nope", input="x")
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="sim", prompt=[], max_tokens=2)
    finally:
        await client.close()
