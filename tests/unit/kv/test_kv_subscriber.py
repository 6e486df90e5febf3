"""Subscribers against real ZMQ sockets: in-order batches, gaps → replay (vLLM's ROUTER protocol) or resync,
publisher restarts, bind mode, and the manager following the endpoint pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import zmq
import zmq.asyncio

from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import (
    AllBlocksCleared,
    BlockStored,
    KVEvent,
    KVEventManager,
    KVEventSource,
    KVEventSubscriber,
    encode_batch,
)
from extproc.datalayer.kvindex import KVBlockIndex

BS = 4
TOPIC = "kv@pod@tiny"


def blocks(first: int, n: int, parent: int | None = None) -> BlockStored:
    """n blocks with engine hashes first..first+n-1; token ids derived from the hash so content differs."""
    hashes = list(range(first, first + n))
    toks = [h * 10 + j for h in hashes for j in range(BS)]
    return BlockStored(hashes, parent, toks, BS)


def keys_of(ev: BlockStored, idx: KVBlockIndex) -> list[int]:
    return idx.keys_for(ev.token_ids, BS)


class Publisher:
    """A vLLM-like publisher: XPUB (so the test can wait for the subscription) + a replay ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context, port: int = 0, replay: bool = True) -> None:
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        try:
            self.pub.bind(f"tcp://127.0.0.1:{port or '*'}")
        except zmq.ZMQError:
            self.pub.close(linger=0)
            raise
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self.replay_requests: list[int] = []
        self._task: asyncio.Task[None] | None = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            ident, empty, start_b = await self.router.recv_multipart()
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            for seq, payload in self.buffer:
                if seq >= start:
                    await self.router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def wait_subscribed(self) -> None:
        msg = await asyncio.wait_for(self.pub.recv(), 5)
        assert msg[0] == 1  # a subscribe message

    async def publish(self, events: list[KVEvent], *, drop: bool = False) -> int:
        seq = self.seq
        self.seq += 1
        payload = encode_batch(events, float(seq), 0)
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([TOPIC.encode(), seq.to_bytes(8, "big"), payload])
        return seq

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
async def index() -> KVBlockIndex:
    return KVBlockIndex()


async def started(ctx: zmq.asyncio.Context, pub: Publisher, index: KVBlockIndex, replay: bool = True) -> KVEventSubscriber:
    src = KVEventSource(pub.endpoint, pub.replay_endpoint if replay else None, "kv@")
    sub = KVEventSubscriber("pod:1", src, index, ctx=ctx, backoff_initial_s=0.05)
    sub.start()
    await pub.wait_subscribed()
    return sub


async def test_in_order_batches_feed_the_index(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    sub = await started(ctx, pub, index, replay=False)
    try:
        e0, e1 = blocks(1, 2), blocks(3, 1, parent=2)
        await pub.publish([e0])
        await pub.publish([e1])
        keys = idx_keys = keys_of(BlockStored([], None, e0.token_ids + e1.token_ids, BS), index)
        await until(lambda: index.lookup(idx_keys, ["pod:1"]) == {"pod:1": 3})
        assert sub.stats.batches == 2 and sub.stats.events == 2 and sub.stats.gaps == 0
        assert len(keys) == 3
    finally:
        await sub.stop()
        await pub.close()


async def test_gap_is_filled_by_replay(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx)
    sub = await started(ctx, pub, index)
    try:
        e0, e1, e2 = blocks(1, 1), blocks(2, 1, parent=1), blocks(3, 1, parent=2)
        await pub.publish([e0])
        await until(lambda: sub.stats.batches == 1)
        await pub.publish([e1], drop=True)  # lost on the wire, still in the replay buffer
        await pub.publish([e2])
        keys = keys_of(BlockStored([], None, e0.token_ids + e1.token_ids + e2.token_ids, BS), index)
        await until(lambda: index.lookup(keys, ["pod:1"]) == {"pod:1": 3})
        assert pub.replay_requests == [1]
        assert (sub.stats.gaps, sub.stats.replays, sub.stats.resyncs) == (1, 1, 0)
        assert sub.expected == 3
    finally:
        await sub.stop()
        await pub.close()


async def test_gap_without_replay_resyncs(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    sub = await started(ctx, pub, index, replay=False)
    try:
        e0, e2 = blocks(1, 2), blocks(10, 1)
        await pub.publish([e0])
        await until(lambda: sub.stats.batches == 1)
        await pub.publish([blocks(3, 1, parent=2)], drop=True)
        await pub.publish([e2])
        await until(lambda: sub.stats.batches == 2)
        assert (sub.stats.gaps, sub.stats.resyncs) == (1, 1)
        # the pod's earlier entries were dropped (we no longer know what it evicted); the new batch is in
        assert index.lookup(keys_of(e0, index), ["pod:1"]) == {"pod:1": 0}
        assert index.lookup(keys_of(e2, index), ["pod:1"]) == {"pod:1": 1}
    finally:
        await sub.stop()
        await pub.close()


async def test_first_batch_after_connect_replays_from_zero(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx)
    e0 = blocks(1, 2)
    await pub.publish([e0], drop=True)  # sent before anyone subscribed (slow joiner)
    sub = await started(ctx, pub, index)
    try:
        await pub.publish([blocks(3, 1, parent=2)])
        await until(lambda: sub.stats.batches == 2)
        assert pub.replay_requests == [0]
        assert index.lookup(keys_of(e0, index), ["pod:1"]) == {"pod:1": 2}
    finally:
        await sub.stop()
        await pub.close()


async def test_all_blocks_cleared(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    sub = await started(ctx, pub, index, replay=False)
    try:
        e0 = blocks(1, 2)
        await pub.publish([e0])
        await until(lambda: index.lookup(keys_of(e0, index), ["pod:1"]) == {"pod:1": 2})
        await pub.publish([AllBlocksCleared()])
        await until(lambda: sub.stats.batches == 2)
        assert index.lookup(keys_of(e0, index), ["pod:1"]) == {"pod:1": 0}
        assert index.stats.clears == 1
    finally:
        await sub.stop()
        await pub.close()


async def test_reconnects_after_publisher_restart(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    port = int(pub.endpoint.rsplit(":", 1)[1])
    sub = await started(ctx, pub, index, replay=False)
    pub2: Publisher | None = None
    try:
        old = blocks(1, 2)
        for _ in range(3):
            await pub.publish([old])
        await until(lambda: sub.stats.batches == 3)
        await pub.close()
        for _ in range(200):  # the closed socket releases its port asynchronously (ZMQ's I/O thread)
            try:
                pub2 = Publisher(ctx, port=port, replay=False)  # the engine restarted: same address, seq from 0
                break
            except zmq.ZMQError:
                await asyncio.sleep(0.01)
        assert pub2 is not None
        await pub2.wait_subscribed()
        new = blocks(20, 1)
        await pub2.publish([new])
        await until(lambda: sub.stats.batches == 4)
        assert sub.stats.restarts == 1 and sub.stats.resyncs == 1
        assert index.lookup(keys_of(old, index), ["pod:1"]) == {"pod:1": 0}
        assert index.lookup(keys_of(new, index), ["pod:1"]) == {"pod:1": 1}
    finally:
        await sub.stop()
        if pub2 is not None:
            await pub2.close()


async def test_decode_errors_are_counted(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    sub = await started(ctx, pub, index, replay=False)
    try:
        await pub.pub.send_multipart([TOPIC.encode(), b"\x00" * 8, b"\xc1garbage"])
        await pub.publish([blocks(1, 1)])
        await until(lambda: sub.stats.batches == 1)
        assert sub.stats.decode_errors == 1
    finally:
        await sub.stop()
        await pub.close()


async def test_bind_mode_engine_connects(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    sub = KVEventSubscriber("pod:1", KVEventSource("tcp://127.0.0.1:*", None, "", bind=True), index, ctx=ctx)
    sub.start()
    await asyncio.wait_for(sub.connected.wait(), 5)
    assert sub.bound_endpoint is not None
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(sub.bound_endpoint)
    try:
        e0 = blocks(1, 1)
        seq = 0

        async def send() -> bool:  # PUB drops until the connection is up: resend the same batch (same seq)
            await pub.send_multipart([TOPIC.encode(), seq.to_bytes(8, "big"), encode_batch([e0])])
            return sub.stats.batches > 0

        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while not await send():
            assert loop.time() < end
            await asyncio.sleep(0.02)
        await until(lambda: index.lookup(keys_of(e0, index), ["pod:1"]) == {"pod:1": 1})
    finally:
        pub.close(linger=0)
        await sub.stop()


async def test_manager_follows_the_pool(ctx: zmq.asyncio.Context, index: KVBlockIndex) -> None:
    pub = Publisher(ctx, replay=False)
    pool = EndpointPool()
    mgr = KVEventManager(pool, index, {"127.0.0.1:8001": KVEventSource(pub.endpoint)})
    await mgr.start()
    try:
        pool.set_endpoints(["127.0.0.1:8001", "127.0.0.1:8002"])  # the second pod has no source
        assert set(mgr.subscribers) == {"127.0.0.1:8001"}
        await pub.wait_subscribed()
        e0 = blocks(1, 2)
        await pub.publish([e0])
        await until(lambda: index.lookup(keys_of(e0, index), ["127.0.0.1:8001"]) == {"127.0.0.1:8001": 2})
        pool.set_endpoints(["127.0.0.1:8002"])  # the pod leaves: subscriber stopped, its entries dropped
        assert mgr.subscribers == {}
        assert index.lookup(keys_of(e0, index), ["127.0.0.1:8001"]) == {"127.0.0.1:8001": 0}
        assert mgr.stats()["batches"] == 1 and mgr.stats()["subscribers"] == 0
    finally:
        await mgr.stop()
        await pub.close()
