"""vLLM KV-cache events: decoding, per-pod ZMQ subscribers, and a manager that follows the endpoint pool.

Wire format (vLLM ``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``): a PUB socket sends multipart
``[topic, seq (8-byte big-endian), msgpack(batch)]``. A batch is ``[ts, [events...], dp_rank]`` (msgspec
``array_like``) or, with newer encoders, a map ``{"ts", "events", "data_parallel_rank"}``. Each event is a
tagged struct: a map ``{"type": "BlockStored", ...}`` (newer) or an array ``["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
kv_cache_spec_kind, kv_cache_spec_sliding_window]`` (older; trailing defaults may be omitted).
``BlockRemoved`` is ``[tag, block_hashes, medium, group_idx]``; ``AllBlocksCleared`` has no fields.
Block hashes are ints (older vLLM) or SHA-256 bytes (newer); bytes are folded to the big-endian integer of
their last 8 bytes, as llm-d does (``pkg/kvcache/kvevents/pool.go``, ``getHashAsUint64``).

Replay (same file, ``_service_replay``): a ROUTER socket takes ``[identity, b"", start_seq (8 bytes BE)]`` and
answers, per buffered batch with seq >= start, ``[identity, b"", topic, seq, payload]`` (vLLM 0.32; older
releases omit the topic frame: ``[identity, b"", seq, payload]``), then the end marker ``[identity, b"", b"",
-1 (8 bytes BE signed), b""]`` (older: without the empty topic frame). We accept both shapes. We speak to it with a DEALER (a REQ socket cannot receive several replies).

Sequence numbers start at 0 per publisher process and grow by one per batch. A subscriber detects:
* a gap (seq > expected): replay from ``expected`` if the pod has a replay endpoint; otherwise (or if the
  replay does not cover the gap) resync = drop everything the index holds for that pod and carry on;
* a restart (seq < expected, outside the range we just replayed): the engine restarted with an empty cache
  → resync, then (if replay is configured) replay from 0 to recover what was sent before we reconnected;
* the first batch after connecting with seq > 0: replay from 0 if possible (the pod may hold blocks stored
  before we subscribed); otherwise accept it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio

from extproc.datalayer.endpoint import Endpoint, EndpointPool
from extproc.services import ServiceKey

log = logging.getLogger(__name__)

_END_SEQ = -1


class DecodeError(ValueError):
    """A message that is not a vLLM KV-event batch."""


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"
    lora_name: str | None = None
    group_idx: int = 0
    kv_cache_spec_kind: str = "full_attention"
    kv_cache_spec_sliding_window: int | None = None

    @property
    def lora_key(self) -> str | None:
        """The adapter part of a block's identity: ``lora_name`` (newer vLLM) or the numeric id (older)."""
        if self.lora_name:
            return self.lora_name
        if self.lora_id is not None and self.lora_id != 0:
            return str(self.lora_id)
        return None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    topic: str
    seq: int
    ts: float
    dp_rank: int | None
    events: list[KVEvent]
    unknown: int = 0  # events of types we do not know (ignored)


# ------------------------------------------------------------------------------------------------ decoding
def _hash(v: Any) -> int:
    if isinstance(v, bool):
        raise DecodeError("block hash is a boolean")
    if isinstance(v, int):
        return v & 0xFFFFFFFFFFFFFFFF
    if isinstance(v, (bytes, bytearray)):
        if not v:
            raise DecodeError("empty block hash")
        return int.from_bytes(bytes(v[-8:]), "big")
    raise DecodeError(f"block hash of type {type(v).__name__}")


def _hashes(v: Any) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise DecodeError("block_hashes is not a list")
    return [_hash(h) for h in v]


def _int(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise DecodeError(f"expected an integer, got {type(v).__name__}")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v, 0)


def _str(v: Any, default: str) -> str:
    if v is None:
        return default
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise DecodeError(f"expected a string, got {type(v).__name__}")
    return v


def _tokens(v: Any) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise DecodeError("token_ids is not a list of integers")
    return v


_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def _as_map(tag: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
    return dict(zip(names, raw[1:]))


def decode_event(raw: Any) -> KVEvent | None:
    """One event (map or array encoding). Returns None for an unknown type; raises DecodeError if malformed."""
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise DecodeError("event is neither a map nor a tagged array")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if not isinstance(tag, str):
        raise DecodeError("event has no type tag")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if tag not in ("BlockStored", "BlockRemoved"):
        return None
    m = _as_map(tag, raw)
    if tag == "BlockRemoved":
        return BlockRemoved(_hashes(m.get("block_hashes")), _str(m.get("medium"), "GPU").upper(), _int(m.get("group_idx"), 0))
    parent = m.get("parent_block_hash")
    lora_name = m.get("lora_name")
    return BlockStored(
        block_hashes=_hashes(m.get("block_hashes")),
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=_tokens(m.get("token_ids")),
        block_size=_int(m.get("block_size"), 0),
        lora_id=_opt_int(m.get("lora_id")),
        medium=_str(m.get("medium"), "GPU").upper(),
        lora_name=None if lora_name is None else _str(lora_name, ""),
        group_idx=_int(m.get("group_idx"), 0),
        kv_cache_spec_kind=_str(m.get("kv_cache_spec_kind"), "full_attention"),
        kv_cache_spec_sliding_window=_opt_int(m.get("kv_cache_spec_sliding_window")),
    )


def decode_payload(payload: bytes, *, topic: str = "", seq: int = 0) -> EventBatch:
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"payload is not msgpack: {e}") from None
    if isinstance(batch, dict):
        ts, events, dp = batch.get("ts"), batch.get("events"), batch.get("data_parallel_rank")
    elif isinstance(batch, list) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
        dp = batch[2] if len(batch) > 2 else None
    else:
        raise DecodeError("batch is neither [ts, events, dp_rank] nor a map")
    if not isinstance(events, list):
        raise DecodeError("batch events is not a list")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        ts = 0.0
    out: list[KVEvent] = []
    unknown = 0
    for raw in events:
        ev = decode_event(raw)
        if ev is None:
            unknown += 1
        else:
            out.append(ev)
    return EventBatch(topic, seq, float(ts), dp if isinstance(dp, int) and not isinstance(dp, bool) else None, out, unknown)


def decode_seq(b: bytes) -> int:
    if len(b) != 8:
        raise DecodeError(f"sequence frame has {len(b)} bytes, not 8")
    return int.from_bytes(b, "big", signed=True)


def decode_message(frames: list[bytes]) -> EventBatch:
    """A PUB message ``[topic, seq, payload]`` → EventBatch. Raises DecodeError when malformed."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic_b, seq_b, payload = frames
    return decode_payload(payload, topic=bytes(topic_b).decode("utf-8", "replace"), seq=decode_seq(bytes(seq_b)))


def encode_batch(events: Iterable[KVEvent], ts: float = 0.0, dp_rank: int | None = 0, *, array_events: bool = False) -> bytes:
    """Encode a batch the way vLLM does (map events by default, the older array form on request). Used by
    tests and by anything that needs to publish events (e.g. a simulator)."""
    enc: list[Any] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            fields = [
                ev.block_hashes,
                ev.parent_block_hash,
                ev.token_ids,
                ev.block_size,
                ev.lora_id,
                ev.medium,
                ev.lora_name,
                None,
                ev.group_idx,
                ev.kv_cache_spec_kind,
                ev.kv_cache_spec_sliding_window,
            ]
            names = _STORED_FIELDS
            tag = "BlockStored"
        elif isinstance(ev, BlockRemoved):
            fields, names, tag = [ev.block_hashes, ev.medium, ev.group_idx], _REMOVED_FIELDS, "BlockRemoved"
        else:
            fields, names, tag = [], (), "AllBlocksCleared"
        if array_events:
            enc.append([tag, *fields])
        else:
            d: dict[str, Any] = {"type": tag}
            d.update(zip(names, fields))
            enc.append(d)
    return msgpack.packb([ts, enc, dp_rank], use_bin_type=True)


# ------------------------------------------------------------------------------------------------ subscriber
class EventSink(Protocol):
    """Where decoded events go (the KV block index)."""

    def apply(self, address: str, events: Iterable[KVEvent]) -> None: ...

    def drop_pod(self, address: str, *, keep_groups: bool = False) -> int: ...


@dataclass(slots=True)
class KVEventSource:
    """Where a pod publishes its events. ``bind`` = we bind ``endpoint`` and the engine connects to it."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    bind: bool = False


@dataclass(slots=True)
class SubscriberStats:
    events: int = 0
    batches: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    replay_failures: int = 0
    resyncs: int = 0
    restarts: int = 0
    decode_errors: int = 0
    unknown_events: int = 0
    duplicates: int = 0
    reconnects: int = 0


class KVEventSubscriber:
    """One pod's event stream: a SUB socket (connecting to the pod's PUB, or bound for the pod to connect),
    sequence tracking, replay over a DEALER, resync, and reconnect with backoff. Runs as one asyncio task;
    decoding and index updates happen in that task, never on the decision path."""

    def __init__(
        self,
        address: str,
        source: KVEventSource,
        sink: EventSink,
        *,
        ctx: zmq.asyncio.Context | None = None,
        replay_timeout_s: float = 1.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        on_batch: Callable[[str, EventBatch], None] | None = None,
    ) -> None:
        self.address = address
        self.source = source
        self.sink = sink
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.replay_timeout_s = replay_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_batch = on_batch
        self.stats = SubscriberStats()
        self.expected: int | None = None  # next sequence number we expect; None = not synchronised yet
        # Batches in [lo, hi) came from the last replay: the SUB socket's own copies of them are duplicates.
        self._replayed: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self.connected = asyncio.Event()
        self.bound_endpoint: str | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events:{self.address}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _open(self) -> zmq.asyncio.Socket:
        s = self._ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 100_000)
        # Native reconnect backoff for connect mode; heartbeats detect a dead peer behind a live TCP path.
        s.setsockopt(zmq.RECONNECT_IVL, int(self.backoff_initial_s * 1000))
        s.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff_max_s * 1000))
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        s.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        if self.source.bind:
            s.bind(self.source.endpoint)
            # The concrete address (an endpoint like tcp://127.0.0.1:* binds a free port) for engines to dial.
            self.bound_endpoint = s.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            s.connect(self.source.endpoint)
        return s

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self.connected.clear()

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        while True:
            try:
                self._sock = self._open()
                self.connected.set()
                delay = self.backoff_initial_s
                while True:
                    frames = await self._sock.recv_multipart()
                    await self._handle(frames)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                self.stats.reconnects += 1
                log.warning("kv-event socket error; reconnecting", extra={"pod": self.address, "error": str(e), "delay_s": delay})
            finally:
                self._close()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self.backoff_max_s, delay * 2)

    # -------------------------------------------------------------- message handling
    async def _handle(self, frames: list[bytes]) -> None:
        try:
            batch = decode_message(frames)
        except DecodeError as e:
            self.stats.decode_errors += 1
            log.debug("undecodable kv-event message", extra={"pod": self.address, "error": str(e)})
            return
        seq = batch.seq
        exp = self.expected
        if exp is None:
            if seq > 0 and self.source.replay_endpoint:
                await self._catch_up(0, batch)
                return
        elif seq < exp:
            rr = self._replayed
            if rr is not None and rr[0] <= seq < rr[1]:
                self.stats.duplicates += 1  # already applied from a replay
                return
            self.stats.restarts += 1
            log.info("kv-event publisher restarted; resynchronising", extra={"pod": self.address, "seq": seq, "expected": exp})
            self._resync()
            if seq > 0 and self.source.replay_endpoint:
                await self._catch_up(0, batch)
                return
        elif seq > exp:
            self.stats.gaps += 1
            log.info("kv-event sequence gap", extra={"pod": self.address, "seq": seq, "expected": exp})
            if self.source.replay_endpoint:
                await self._catch_up(exp, batch)
            else:
                self._resync()
                self._apply(batch)
            return
        else:
            self._replayed = None  # the in-order stream has passed every replayed batch
        self._apply(batch)

    def _apply(self, batch: EventBatch) -> None:
        self.sink.apply(self.address, batch.events)
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        self.stats.unknown_events += batch.unknown
        self.expected = batch.seq + 1
        if self.on_batch is not None:
            self.on_batch(self.address, batch)

    def _resync(self) -> None:
        self.stats.resyncs += 1
        self.sink.drop_pod(self.address)
        self.expected = None
        self._replayed = None

    async def _catch_up(self, start: int, current: EventBatch) -> None:
        """Replay [start, ...] and then apply ``current`` if the replay did not already include it. If the
        replay fails or starts later than ``start``, resync instead."""
        batches = await self.replay(start)
        if not batches or batches[0].seq > start:
            self.stats.replay_failures += 1
            self._resync()
            self._apply(current)
            return
        self.stats.replays += 1
        for b in batches:
            if self.expected is None or b.seq >= self.expected:
                self._apply(b)
                self.stats.replayed_batches += 1
        if self.expected is None or current.seq >= self.expected:
            self._apply(current)
        assert self.expected is not None
        self._replayed = (start, self.expected)

    async def replay(self, start: int) -> list[EventBatch] | None:
        """Ask the pod's replay ROUTER for batches from ``start``. None on timeout or error."""
        ep = self.source.replay_endpoint
        if not ep:
            return None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        out: list[EventBatch] = []
        try:
            dealer.connect(ep)
            await dealer.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.replay_timeout_s
            while True:
                left = deadline - loop.time()
                if left <= 0 or not await dealer.poll(int(left * 1000)):
                    log.warning("kv-event replay timed out", extra={"pod": self.address, "start": start})
                    return None
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3:  # vLLM 0.32: [topic, seq, payload]; the end marker has an empty topic
                    frames = frames[1:]
                if len(frames) != 2:
                    self.stats.decode_errors += 1
                    continue
                seq = decode_seq(frames[0])
                if seq == _END_SEQ:
                    return out
                try:
                    out.append(decode_payload(frames[1], topic=self.source.topic, seq=seq))
                except DecodeError:
                    self.stats.decode_errors += 1
        except (zmq.ZMQError, DecodeError) as e:
            log.warning("kv-event replay failed", extra={"pod": self.address, "error": str(e)})
            return None
        finally:
            dealer.close(linger=0)


# ------------------------------------------------------------------------------------------------ shared stream
def pod_of_topic(topic: bytes) -> str | None:
    """The pod identifier of a vLLM topic ``<prefix>@<pod>@<model>`` (llm-d's convention ``kv@${POD_IP}@model``,
    llm-d-kv-cache ``pkg/kvevents/engineadapter/vllm_adapter.go`` parseVLLMTopic); None when it has no pod part."""
    parts = topic.decode("utf-8", "replace").split("@")
    if len(parts) != 3 or not parts[1]:
        return None
    return parts[1]


class SharedKVEventStream:
    """One SUB socket bound at ``endpoint`` that every pod's publisher connects to: llm-d's
    ``kvEventsConfig.zmqEndpoint`` (e.g. ``tcp://*:5557``; vLLM connects its PUB to a non-wildcard tcp endpoint,
    vllm/distributed/kv_events.py ``ZmqEventPublisher._is_bind_endpoint``). Messages are told apart by their topic
    (:func:`pod_of_topic`): the pod part is a pool address (``host:port``) or a pod IP, matched to the one pool
    endpoint on that host. Each pod keeps its own sequence tracking — a :class:`KVEventSubscriber` without a
    socket, fed the frames — so a gap or a restart resynchronises that pod alone (no replay: a replay endpoint is
    per pod). Events from a pod outside the pool are dropped and counted. One asyncio task, off the decision path."""

    def __init__(
        self,
        endpoint: str,
        pool: EndpointPool,
        sink: EventSink,
        *,
        topic_filter: str = "kv@",
        ctx: zmq.asyncio.Context | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.sink = sink
        self.topic_filter = topic_filter
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.pods: dict[str, KVEventSubscriber] = {}  # pool address -> its sequence tracking
        self._resolved: dict[str, str | None] = {}  # topic pod id -> pool address (None: not in the pool)
        self.unknown_pods = 0  # messages from a pod the pool does not have (or an ambiguous pod IP)
        self.bad_topics = 0
        self.closed_stats = SubscriberStats()
        self.bound_endpoint: str | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sock: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        """Binds now (so :attr:`bound_endpoint` is known when the server reports ready; a ``*`` port is resolved)
        and receives in a task; a failed bind is retried by the task with back-off."""
        if self._task is None or self._task.done():
            if self._sock is None:
                try:
                    self._sock = self._open()
                except zmq.ZMQError as e:
                    log.warning("kv-event shared endpoint: bind failed; retrying", extra={"endpoint": self.endpoint, "error": str(e)})
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-shared:{self.endpoint}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close()

    def pool_changed(self, removed: Iterable[str]) -> None:
        """Pods left (their index entries are dropped by the manager) or joined: forget the topic mapping."""
        self._resolved.clear()
        for addr in removed:
            sub = self.pods.pop(addr, None)
            if sub is not None:
                _fold(self.closed_stats, sub.stats)

    def resolve(self, pod_id: str) -> str | None:
        hit = self._resolved.get(pod_id, "")
        if hit != "":
            return hit
        addr: str | None = pod_id if self.pool.get(pod_id) is not None else None
        if addr is None:
            same_host = [ep.address for ep in self.pool.snapshot() if ep.host == pod_id]
            addr = same_host[0] if len(same_host) == 1 else None
            if len(same_host) > 1:
                log.warning("kv-event topic names a host with several pool endpoints; give host:port in the topic",
                            extra={"pod": pod_id, "endpoints": same_host})  # fmt: skip
        self._resolved[pod_id] = addr
        return addr

    def _open(self) -> zmq.asyncio.Socket:
        s = self._ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.SUBSCRIBE, self.topic_filter.encode())
        s.bind(self.endpoint)
        self.bound_endpoint = s.getsockopt(zmq.LAST_ENDPOINT).decode()
        return s

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self.connected.clear()

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        while True:
            try:
                if self._sock is None:
                    self._sock = self._open()
                self.connected.set()
                log.info("kv-event shared endpoint bound", extra={"endpoint": self.bound_endpoint})
                delay = self.backoff_initial_s
                while True:
                    frames = await self._sock.recv_multipart()
                    await self._handle(frames)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                self.closed_stats.reconnects += 1
                log.warning("kv-event shared endpoint error; rebinding", extra={"endpoint": self.endpoint, "error": str(e), "delay_s": delay})
            finally:
                self._close()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self.backoff_max_s, delay * 2)

    async def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.closed_stats.decode_errors += 1
            return
        pod_id = pod_of_topic(frames[0])
        if pod_id is None:
            self.bad_topics += 1
            return
        addr = self.resolve(pod_id)
        if addr is None:
            self.unknown_pods += 1
            return
        sub = self.pods.get(addr)
        if sub is None:
            sub = self.pods[addr] = KVEventSubscriber(addr, KVEventSource(self.endpoint, None, self.topic_filter, True), self.sink, ctx=self._ctx)
        await sub._handle(frames)  # sequence tracking per pod; no replay endpoint, so this never awaits the network

    def stats(self) -> SubscriberStats:
        acc = SubscriberStats()
        _fold(acc, self.closed_stats)
        for sub in self.pods.values():
            _fold(acc, sub.stats)
        return acc


def _fold(acc: SubscriberStats, s: SubscriberStats) -> None:
    for k in s.__dataclass_fields__:
        setattr(acc, k, getattr(acc, k) + getattr(s, k))


# ------------------------------------------------------------------------------------------------ manager
def sources_from_json(obj: Any) -> dict[str, KVEventSource]:
    """Pod address → KVEventSource from config or a simulator's JSON line. Accepts
    ``{"pods": [{"address": "h:p", "kv_events_endpoint": ..., "kv_replay_endpoint": ..., "kv_topic": ...}]}``,
    a list of such pod objects, or a mapping address → {"endpoint", "replay_endpoint", "topic", "bind"}."""
    if isinstance(obj, (str, bytes)):
        obj = json.loads(obj)
    out: dict[str, KVEventSource] = {}
    if isinstance(obj, dict) and "pods" in obj:
        obj = obj["pods"]
    if isinstance(obj, list):
        for p in obj:
            if not isinstance(p, dict) or "address" not in p:
                raise ValueError("each pod needs an 'address'")
            ep = p.get("kv_events_endpoint") or p.get("endpoint")
            if not ep:
                continue  # this pod publishes no events
            out[str(p["address"])] = KVEventSource(
                str(ep), p.get("kv_replay_endpoint") or p.get("replay_endpoint"), str(p.get("kv_topic") or p.get("topic") or ""), bool(p.get("bind", False))
            )
        return out
    if isinstance(obj, dict):
        for addr, v in obj.items():
            if isinstance(v, str):
                out[str(addr)] = KVEventSource(v)
            elif isinstance(v, dict) and v.get("endpoint"):
                out[str(addr)] = KVEventSource(str(v["endpoint"]), v.get("replay_endpoint") or v.get("replay"), str(v.get("topic") or ""), bool(v.get("bind", False)))
            else:
                raise ValueError(f"pod {addr!r}: expected an endpoint string or a mapping with 'endpoint'")
        return out
    raise ValueError("kv-event sources must be a mapping or a list of pods")


@dataclass(slots=True)
class SourceTemplate:
    """Per-pod endpoints derived from the pod's host/port (e.g. ``tcp://{host}:5557``) when not listed."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    bind: bool = False

    def render(self, ep: Endpoint) -> KVEventSource:
        kw = {"host": ep.host, "port": ep.port, "address": ep.address}
        return KVEventSource(
            self.endpoint.format(**kw),
            self.replay_endpoint.format(**kw) if self.replay_endpoint else None,
            self.topic.format(**kw),
            self.bind,
        )


# the KV-event manager of a config (a background Service: subscribers per pod)
KV_EVENTS: ServiceKey[KVEventManager] = ServiceKey("kv_events")


@dataclass(slots=True)
class KVEventManager:
    """Starts/stops one subscriber per pod as pods join/leave the pool; a leaving pod's index entries go too.

    ``sources`` names pods explicitly; ``template`` covers pods not named. The server calls ``start()`` and
    ``stop()``; pool changes before ``start()`` are picked up at start."""

    pool: EndpointPool
    sink: EventSink
    sources: dict[str, KVEventSource] = field(default_factory=dict)
    template: SourceTemplate | None = None
    replay_timeout_s: float = 1.0
    # one bound endpoint every pod publishes to, pods told apart by topic (llm-d's kvEventsConfig.zmqEndpoint)
    shared_endpoint: str | None = None
    shared_topic_filter: str = "kv@"
    subscribers: dict[str, KVEventSubscriber] = field(default_factory=dict)
    shared: SharedKVEventStream | None = None
    _ctx: zmq.asyncio.Context | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _closed_stats: SubscriberStats = field(default_factory=SubscriberStats)
    _stopping: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Listen from the start: a pod leaving before start() must still lose its index entries.
        self.pool.add_listener(self._on_pool_change)

    def source_for(self, ep: Endpoint) -> KVEventSource | None:
        s = self.sources.get(ep.address)
        if s is None and self.template is not None:
            s = self.template.render(ep)
        return s

    def set_sources(self, sources: Mapping[str, KVEventSource]) -> None:
        """Replace the explicit sources (e.g. after reading a simulator's JSON line); restarts what changed."""
        self.sources = dict(sources)
        if self._loop is not None:
            for ep in self.pool.snapshot():
                sub = self.subscribers.get(ep.address)
                src = self.source_for(ep)
                if sub is not None and (src is None or sub.source != src):
                    self._stop_sub(ep.address, drop=True)
                if src is not None and ep.address not in self.subscribers:
                    self._start_sub(ep, src)

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        if self.shared_endpoint:
            self.shared = SharedKVEventStream(self.shared_endpoint, self.pool, self.sink, topic_filter=self.shared_topic_filter, ctx=self._ctx)
            self.shared.start()
        for ep in self.pool.snapshot():
            src = self.source_for(ep)
            if src is not None and ep.address not in self.subscribers:
                self._start_sub(ep, src)
        log.info("kv-event manager started", extra={"subscribers": len(self.subscribers)})

    async def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        subs = list(self.subscribers.values())
        self.subscribers.clear()
        for s in subs:
            self._fold_stats(s.stats)
        shared, self.shared = self.shared, None
        if shared is not None:
            self._fold_stats(shared.stats())
            await shared.stop()
        await asyncio.gather(*(s.stop() for s in subs), *self._stopping, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        loop = self._loop
        if loop is None:
            for ep in removed:
                self.sink.drop_pod(ep.address)
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:  # called from another thread (or outside the loop): hop onto our loop
            loop.call_soon_threadsafe(self._on_pool_change, added, removed)
            return
        for ep in removed:
            self._stop_sub(ep.address, drop=True)
        if self.shared is not None:
            self.shared.pool_changed([ep.address for ep in removed])
        for ep in added:
            src = self.source_for(ep)
            if src is not None and ep.address not in self.subscribers:
                self._start_sub(ep, src)

    def _start_sub(self, ep: Endpoint, src: KVEventSource) -> None:
        sub = KVEventSubscriber(ep.address, src, self.sink, ctx=self._ctx, replay_timeout_s=self.replay_timeout_s)
        self.subscribers[ep.address] = sub
        sub.start()
        log.debug("kv-event subscriber started", extra={"pod": ep.address, "endpoint": src.endpoint})

    def _stop_sub(self, address: str, *, drop: bool) -> None:
        sub = self.subscribers.pop(address, None)
        if sub is not None:
            self._fold_stats(sub.stats)
            assert self._loop is not None
            t = self._loop.create_task(sub.stop())
            self._stopping.add(t)
            t.add_done_callback(self._stopping.discard)
        if drop:
            self.sink.drop_pod(address)

    def _fold_stats(self, s: SubscriberStats) -> None:
        _fold(self._closed_stats, s)

    def stats(self) -> dict[str, int]:
        """Counters summed over current and past subscribers, plus the number of live subscribers (with a shared
        endpoint: also the pods heard on it, and messages from pods outside the pool)."""
        acc = {k: getattr(self._closed_stats, k) for k in self._closed_stats.__dataclass_fields__}
        for sub in self.subscribers.values():
            for k in acc:
                acc[k] += getattr(sub.stats, k)
        acc["subscribers"] = len(self.subscribers)
        shared = self.shared
        if shared is not None:
            st = shared.stats()
            for k in st.__dataclass_fields__:
                acc[k] += getattr(st, k)
            acc["subscribers"] += len(shared.pods)
            acc["shared_unknown_pods"] = shared.unknown_pods
            acc["shared_bad_topics"] = shared.bad_topics
        return acc
