"""(d) Our KV-event decoder and subscriber understand a real vLLM 0.32 server's ZMQ events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import pytest
import zmq
import zmq.asyncio

from extproc.datalayer.kvevents import (
    BlockStored,
    KVEvent,
    KVEventSource,
    KVEventSubscriber,
    decode_message,
    decode_payload,
    decode_seq,
)
from extproc.sim.calibrate import VllmServer, _Rng

from .conftest import MODEL
from .helpers import post_json

pytestmark = pytest.mark.asyncio(loop_scope="session")

BLOCK = 128  # vLLM CPU block size (checked against vllm:cache_config_info in test_metrics_parity)


async def _complete(pod: VllmServer, prompt: list[int]) -> None:
    async with aiohttp.ClientSession() as s:
        status, _, body = await post_json(
            s, pod.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        )
    assert status == 200, body


def _stored_tokens(events: Iterable[KVEvent]) -> list[int]:
    out: list[int] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out += ev.token_ids
    return out


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


async def _replay_all(pod: VllmServer, ctx: zmq.asyncio.Context) -> list[tuple[int, bytes]]:
    """Ask the replay ROUTER for every buffered batch from seq 0 (vLLM's protocol; end marker seq -1)."""
    assert pod.kv_replay_endpoint is not None
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pod.kv_replay_endpoint)
    out: list[tuple[int, bytes]] = []
    try:
        await sock.send_multipart([b"", (0).to_bytes(8, "big")])
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), 30)
            # vLLM 0.32 answers [b"", topic, seq, payload] and ends with [b"", b"", -1, b""]
            assert len(frames) == 4 and frames[0] == b"", frames[:3]
            _, topic, seq_b, payload = frames
            seq = decode_seq(seq_b)
            assert topic in (pod.kv_topic.encode(), b"")
            if seq == -1:
                return out
            out.append((seq, payload))
    finally:
        sock.close()


async def test_replay_returns_block_stored_with_prompt_tokens(vllm_pods: list[VllmServer]) -> None:
    pod = vllm_pods[0]
    prompt = _Rng(4242).tokens(2 * BLOCK + 44)
    await _complete(pod, prompt)
    ctx = zmq.asyncio.Context()
    try:
        found: list[int] = []
        for _ in range(50):  # the engine publishes after the step; poll the replay buffer until it shows up
            batches = await _replay_all(pod, ctx)
            seqs = [s for s, _ in batches]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            found = _stored_tokens(ev for _, p in batches for ev in decode_payload(p).events)
            if _contains(found, prompt[: 2 * BLOCK]):
                break
            await asyncio.sleep(0.1)
        # only full blocks are published: both full blocks of the prompt, never its 44-token tail
        assert _contains(found, prompt[: 2 * BLOCK])
        assert not _contains(found, prompt[: 2 * BLOCK + 1])
    finally:
        ctx.destroy(linger=0)


async def test_live_sub_socket_decodes_block_stored(vllm_pods: list[VllmServer]) -> None:
    pod = vllm_pods[1]
    assert pod.kv_endpoint is not None
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pod.kv_endpoint)
    try:
        rng = _Rng(777)
        target: list[int] = []
        seen: list[int] = []
        # PUB/SUB drops messages sent before the subscription is in place: send prompts until one's blocks
        # arrive (the first usually does), then check the decoded batch in detail.
        for attempt in range(5):
            target = rng.tokens(3 * BLOCK + 5)
            await _complete(pod, target)
            deadline = asyncio.get_running_loop().time() + 10
            while asyncio.get_running_loop().time() < deadline:
                try:
                    frames = await asyncio.wait_for(sub.recv_multipart(), 1.0)
                except TimeoutError:
                    continue
                batch = decode_message(frames)
                assert batch.topic == pod.kv_topic
                assert batch.seq >= 0
                assert batch.unknown == 0
                stored = [e for e in batch.events if isinstance(e, BlockStored)]
                for ev in stored:
                    assert ev.block_size == BLOCK
                    assert len(ev.token_ids) == BLOCK * len(ev.block_hashes)
                    assert ev.medium == "GPU"  # vLLM's name for the primary KV medium, also on CPU
                    assert ev.kv_cache_spec_kind == "full_attention"
                seen += _stored_tokens(stored)
                if _contains(seen, target[: 3 * BLOCK]):
                    break
            if _contains(seen, target[: 3 * BLOCK]):
                break
        assert _contains(seen, target[: 3 * BLOCK]), f"no BlockStored for the prompt after {attempt + 1} tries"
    finally:
        sub.close()
        ctx.destroy(linger=0)


class _Sink:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.changed = asyncio.Event()

    def apply(self, address: str, events: Iterable[KVEvent]) -> None:
        self.tokens += _stored_tokens(events)
        self.changed.set()

    def drop_pod(self, address: str, *, keep_groups: bool = False) -> int:
        self.tokens.clear()
        return 0


async def test_subscriber_with_replay_recovers_events_sent_before_it_connected(vllm_pods: list[VllmServer]) -> None:
    pod = vllm_pods[0]
    early = _Rng(99_001).tokens(BLOCK + 3)
    await _complete(pod, early)  # published before our subscriber exists: only replay can bring it back
    sink = _Sink()
    sub = KVEventSubscriber(
        pod.address, KVEventSource(pod.kv_endpoint or "", pod.kv_replay_endpoint, pod.kv_topic), sink, replay_timeout_s=5.0
    )
    sub.start()
    try:
        rng = _Rng(99_002)
        lates: list[list[int]] = []
        for _ in range(100):
            if _contains(sink.tokens, early[:BLOCK]) and any(_contains(sink.tokens, t[:BLOCK]) for t in lates):
                break
            lates.append(rng.tokens(BLOCK + 3))
            sink.changed.clear()
            await _complete(pod, lates[-1])  # a new batch makes the subscriber notice it joined mid-stream
            try:
                await asyncio.wait_for(sink.changed.wait(), 1.0)
            except TimeoutError:
                pass
        assert _contains(sink.tokens, early[:BLOCK]), "replay did not recover the earlier BlockStored"
        assert any(_contains(sink.tokens, t[:BLOCK]) for t in lates)
        assert sub.stats.decode_errors == 0
        assert sub.stats.replays >= 1
    finally:
        await sub.stop()
