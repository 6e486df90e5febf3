"""vLLM KV-event publisher over ZMQ (pyzmq asyncio), in vLLM's wire format (vllm/distributed/kv_events.py).

* PUB socket bound to ``tcp://127.0.0.1:<free port>``; each message is three frames
  ``[topic, seq as 8-byte big-endian, msgpack(batch)]`` with batch ``[ts, [events...], dp_rank]``.
* Events are maps tagged with ``type`` (newer vLLM) or, with ``array_encoding=True``, arrays
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]``
  (older vLLM), + ``extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window`` for a hybrid
  model's groups. Only full blocks are ever published (the KV cache only stores full blocks). Map events carry
  ``group_idx`` / ``kv_cache_spec_kind`` (and the window of a sliding-window group) as vLLM's BlockStored does.
* Optional replay ROUTER socket: a client sends ``[b"", start_seq as 8-byte big-endian]`` (DEALER, or REQ's
  envelope); the publisher answers with one ``[b"", seq, payload]`` message per buffered batch with
  seq >= start, then the end marker ``[b"", (-1).to_bytes(8, "big", signed=True), b""]``.
Topic: ``kv@<host:port>@<model>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from extproc.sim.kvcache import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["KVEventPublisher", "encode_event", "encode_batch", "END_SEQ"]

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM_GPU = "GPU"


def encode_event(ev: KVEvent, *, array_encoding: bool = False) -> Any:
    if isinstance(ev, BlockStored):
        hybrid = ev.group_idx != 0 or ev.kind != "full_attention"
        if array_encoding:
            out: list[Any] = [
                "BlockStored", ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.lora_id,
                ev.medium, ev.lora_name,
            ]
            if hybrid:  # the trailing fields of newer vLLM: extra_keys, group_idx, kind, window
                out += [None, ev.group_idx, ev.kind, ev.sliding_window]
            return out
        m: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": ev.block_hashes,
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
            "extra_keys": [([ev.lora_name] if ev.lora_name else None) for _ in ev.block_hashes],
            "group_idx": ev.group_idx,
            "kv_cache_spec_kind": ev.kind,
        }
        if ev.sliding_window is not None:
            m["kv_cache_spec_sliding_window"] = ev.sliding_window
        return m
    if isinstance(ev, BlockRemoved):
        if array_encoding:
            return ["BlockRemoved", ev.block_hashes, ev.medium] + ([ev.group_idx] if ev.group_idx else [])
        return {"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": ev.medium, "group_idx": ev.group_idx}
    if isinstance(ev, AllBlocksCleared):
        return ["AllBlocksCleared"] if array_encoding else {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {ev!r}")


def encode_batch(events: Sequence[KVEvent], ts: float, *, dp_rank: int = 0, array_encoding: bool = False) -> bytes:
    return msgpack.packb([ts, [encode_event(e, array_encoding=array_encoding) for e in events], dp_rank])


class KVEventPublisher:
    """Binds PUB (and optionally ROUTER for replay) on 127.0.0.1 free ports; ``publish`` is non-blocking.
    ``connect``: publish to that endpoint instead (a subscriber bound there, e.g. llm-d's shared
    ``zmqEndpoint``), as vLLM does for a non-wildcard tcp endpoint (vllm/distributed/kv_events.py)."""

    def __init__(
        self,
        topic: str,
        *,
        host: str = "127.0.0.1",
        replay: bool = True,
        buffer_steps: int = 10_000,
        array_encoding: bool = False,
        ctx: zmq.asyncio.Context | None = None,
        connect: str | None = None,
    ) -> None:
        self.topic = topic
        self._topic_b = topic.encode("utf-8")
        self.array_encoding = array_encoding
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        if connect:
            self._pub.connect(connect)
            self.endpoint = connect
        else:
            port = self._pub.bind_to_random_port(f"tcp://{host}")
            self.endpoint = f"tcp://{host}:{port}"
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            rport = self._router.bind_to_random_port(f"tcp://{host}")
            self.replay_endpoint = f"tcp://{host}:{rport}"
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> None:
        if not events:
            return
        payload = encode_batch(events, time.time() if ts is None else ts, array_encoding=self.array_encoding)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic_b, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("kv event PUB queue full on %s; batch %d dropped (replayable)", self.endpoint, seq)

    async def _serve_replay(self) -> None:
        assert self._router is not None
        router = self._router
        try:
            while True:
                frames = await router.recv_multipart()
                if len(frames) != 3:
                    log.warning("invalid replay request with %d frames", len(frames))
                    continue
                client, _empty, start_b = frames
                start = int.from_bytes(start_b, "big")
                # vLLM 0.32's shape (vllm/distributed/kv_events.py, _service_replay): topic, seq, payload
                for seq, buf in list(self._buffer):
                    if seq >= start:
                        await router.send_multipart((client, b"", self._topic_b, seq.to_bytes(8, "big"), buf))
                await router.send_multipart((client, b"", b"", END_SEQ, b""))
        except (asyncio.CancelledError, zmq.ContextTerminated):
            pass
        except zmq.ZMQError as e:
            if e.errno != zmq.ENOTSOCK:
                log.exception("replay socket failed")

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        self._pub.close(linger=0)
