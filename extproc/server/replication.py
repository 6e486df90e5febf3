"""Active-active replicas: what one scheduler replica decides that the others need, shared through Redis pub/sub.

N ``extproc serve`` replicas sit behind one Envoy ext_proc cluster; any replica may route any request. Each one
decides on its own local state only (the hot path never waits on the network). A background task per replica
(:class:`SharedState`) exchanges, through one Redis server's pub/sub (docs/active-active.md says why Redis
pub/sub and not Redis hashes, streams or a ZMQ mesh):

* **in-flight load per pod** — every ``interval_s`` (5 ms) the replica publishes its *own* per-pod counters
  (requests, prefill tokens, decode tokens) for the pods whose counters changed, and all of them every
  ``heartbeat_s``. Absolute values, not deltas: a lost message is repaired by the next one. A receiver adds each
  peer's values to the pod's counters (``Endpoint.add_peer_load``), so every scorer that reads
  ``Endpoint.inflight`` & co. sees the fleet's total with no change to the plugins. A peer silent for
  ``peer_ttl_s`` (killed, partitioned, or Redis down) is dropped: its contribution is subtracted.
* **approximate-prefix inserts** — the ``PrefixIndex`` entries a replica adds at dispatch (``on_add`` hook), in
  batches; peers insert them into their own index (``PrefixIndex.add_remote``). Precise prefix routing needs no
  sharing: every replica subscribes to every pod's KV events itself.
* **precise-prefix in-flight holds and speculative entries** — what a replica's ``precise-prefix-cache`` marks
  as held on a pod at dispatch (until the request completes) or speculatively cached (until its TTL or a
  BlockStored): ``KVBlockIndex.on_hold`` / ``on_release`` / ``on_speculative``; peers apply them with
  ``notify=False`` under ``<peer>/<hold id>`` and release every hold of a peer they drop. The KV events themselves
  are not shared: every replica subscribes to every pod.
* **flow-control occupancy** — the replica's queued count rides on the load message; the sum over peers is
  ``FlowController.peer_queued`` (a peer's queue holds sheddable work back and keeps FIFO across replicas).
* **end of foreign flights** — Envoy's access log and observation streams go to whichever replica the ext_proc
  cluster picks, not necessarily the one that routed the request. Flight keys carry the owner's tag
  (``<tag>.<random>``); a replica that gets an access-log entry for another replica's flight forwards it to the
  owner's channel, and the owner finishes the flight.

Losing Redis: the replica keeps routing on its own state (peers expire after ``peer_ttl_s``), buffers what it
must still tell others (forwarded flight ends, prefix inserts; bounded), reconnects with back-off, and on
reconnection publishes its full state and the buffer. Peers' state comes back with their next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from extproc.datalayer.endpoint import EndpointPool

log = logging.getLogger(__name__)

# message kinds
_LOAD = "s"  # {"t", "r", "c": {addr: [inflight, prefill_tokens, decode_tokens]}, "q": queued, "full": bool}
_PREFIX = "p"  # {"t", "r", "e": [[addr, [hash, ...]], ...]}
_FINISH = "f"  # {"t", "r", "e": [[key, status, outcome, end_wall, upstream_failure], ...]}
# an entry of 9 (same queue and message): a foreign observation stream's view of the response,
# [key, status, outcome, end_wall, upstream_failure, first_wall, prefill_ms, chunks, tail]
_BYE = "b"  # {"t", "r"}: a replica stopping cleanly (peers drop it at once)
_KV = "k"  # {"t", "r", "e": [["h", id, addr, [key...], max_s] | ["u", id] | ["s", addr, [key...], ttl_s], ...]}

KEY_SEPARATOR = "."


def owner_of(key: str) -> str:
    """The replica tag of a flight key ``<tag>.<random>`` ('' for an untagged key)."""
    tag, sep, _ = key.partition(KEY_SEPARATOR)
    return tag if sep else ""


@dataclass(slots=True)
class ReplicationSettings:
    url: str  # redis://host:port/db
    replica_id: str = ""  # default: random; also the flight-key tag
    namespace: str = "extproc"  # channel prefix: replicas of one pool share it
    interval_s: float = 0.005
    heartbeat_s: float = 0.2
    token_refresh_s: float = 0.025  # in-flight token counters (prefill → decode) are re-read at least this often
    peer_ttl_s: float = 0.75
    buffer_limit: int = 100_000  # prefix inserts / forwarded ends kept while Redis is away
    # a forwarded flight end that no subscriber received (PUBLISH counted 0: the owner has not re-subscribed yet
    # after a Redis outage, or is gone) is re-sent for this long, then dropped (the owner's TTL sweep ends it)
    finish_retry_s: float = 10.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 1.0


@dataclass(slots=True)
class _Peer:
    last_seen: float
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    queued: int = 0
    holds: set[str] = field(default_factory=set)  # precise-prefix holds applied for this peer (prefixed ids)


class SharedState:
    """One replica's side of the shared state (see the module docstring). All state lives on the event loop."""

    def __init__(
        self,
        settings: ReplicationSettings,
        pool: EndpointPool,
        *,
        prefix_index: Any = None,
        kv_index: Any = None,
        flow: Any = None,
        access_log: Any = None,
        tracker: Any = None,
    ) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id or secrets.token_hex(4)
        if KEY_SEPARATOR in self.replica_id:
            raise ValueError(f"replica id must not contain {KEY_SEPARATOR!r}: {self.replica_id!r}")
        self.pool = pool
        self.prefix_index = prefix_index
        self.kv_index = kv_index
        self.flow = flow
        self.access_log = access_log
        # FlightTracker: its ``changes`` counter says whether any in-flight count moved since the last tick, so an
        # idle or steady replica does not walk the pool every 5 ms (token counters moving inside a flight, prefill →
        # decode, are picked up at least every ``token_refresh_s``)
        self.tracker = tracker
        self._seen_changes = -1
        self._last_scan = 0.0
        ns = settings.namespace
        self.broadcast = f"{ns}:all"
        self.own_channel = f"{ns}:r:{self.replica_id}"
        self.peers: dict[str, _Peer] = {}
        # per pod: (the Endpoint object the peers' load was added to, [inflight, prefill, decode] added)
        self._applied: dict[str, tuple[Any, list[int]]] = {}
        self._published: dict[str, tuple[int, int, int]] = {}
        self._published_queued = -1
        self._prefix_out: deque[tuple[str, list[int]]] = deque(maxlen=settings.buffer_limit)
        self._kv_out: deque[list[Any]] = deque(maxlen=settings.buffer_limit)
        self._finish_out: dict[str, deque[list[Any]]] = {}
        self._finish_undelivered: dict[str, float] = {}  # owner -> monotonic time of the first unreceived end
        self.finish_redelivered = 0
        self.finish_dropped = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: Any = None
        self.connected = False
        self.connects = 0
        self.sent = 0
        self.received = 0
        self.dropped_peers = 0
        self.last_peer_drop = 0.0  # time.monotonic() of the last peer drop
        self.last_error = ""
        if prefix_index is not None:
            prefix_index.on_add = self._on_prefix_add
        if kv_index is not None:
            kv_index.on_hold = self._on_hold
            kv_index.on_release = self._on_release
            kv_index.on_speculative = self._on_speculative

    # ---------------------------------------------------------------- hot-path hooks (O(1), no I/O)
    def _on_prefix_add(self, hashes: Sequence[int], address: str) -> None:
        self._prefix_out.append((address, list(hashes)))

    def _on_hold(self, hold_id: str, address: str, keys: list[int], max_s: float) -> None:
        self._kv_out.append(["h", hold_id, address, keys, max_s])

    def _on_release(self, hold_id: str) -> None:
        self._kv_out.append(["u", hold_id])

    def _on_speculative(self, address: str, keys: list[int], ttl_s: float) -> None:
        self._kv_out.append(["s", address, keys, ttl_s])

    def forward_finish(self, key: str, status: int, outcome: str, end_wall: float, upstream_failure: bool) -> bool:
        """The access log got an entry for a flight another replica owns: queue it for the owner."""
        owner = owner_of(key)
        if not owner or owner == self.replica_id:
            return False
        q = self._finish_out.get(owner)
        if q is None:
            q = self._finish_out[owner] = deque(maxlen=self.settings.buffer_limit)
        q.append([key, status, outcome, end_wall, upstream_failure])
        return True

    def forward_observation(self, key: str, fields: list[Any]) -> bool:
        """An observation stream saw the response of a flight another replica owns: queue it for the owner (the
        owner gets the TTFT and token sample its predictor trains on). ``fields`` as in ``_FINISH``'s 9-entry."""
        owner = owner_of(key)
        if not owner or owner == self.replica_id:
            return False
        q = self._finish_out.get(owner)
        if q is None:
            q = self._finish_out[owner] = deque(maxlen=self.settings.buffer_limit)
        q.append([key, *fields])
        return True

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connection_loop(), name="replication-connection"),
            loop.create_task(self._expire_loop(), name="replication-expiry"),
        ]

    async def stop(self) -> None:
        if self._redis is not None and self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.publish(self.broadcast, self._pack({"t": _BYE, "r": self.replica_id})), 0.5)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for peer in list(self.peers):
            self._drop_peer(peer)
        if self.prefix_index is not None and getattr(self.prefix_index, "on_add", None) == self._on_prefix_add:
            self.prefix_index.on_add = None
        if self.kv_index is not None:
            self.kv_index.on_hold = self.kv_index.on_release = self.kv_index.on_speculative = None
        await self._close()

    async def _close(self) -> None:
        r, self._redis = self._redis, None
        self.connected = False
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "replica_id": self.replica_id,
            "connected": self.connected,
            "connects": self.connects,
            "peers": {p: {"age_s": round(now - v.last_seen, 3), "queued": v.queued, "inflight": sum(c[0] for c in v.counts.values())} for p, v in self.peers.items()},
            "sent": self.sent,
            "received": self.received,
            "dropped_peers": self.dropped_peers,
            "last_peer_drop_monotonic": self.last_peer_drop,
            "buffered_prefix": len(self._prefix_out),
            "buffered_kv": len(self._kv_out),
            "buffered_finish": sum(len(q) for q in self._finish_out.values()),
            "finish_undelivered_owners": sorted(self._finish_undelivered),
            "finish_redelivered": self.finish_redelivered,
            "finish_dropped": self.finish_dropped,
            "last_error": self.last_error,
        }

    def own_load(self, address: str) -> tuple[int, int, int]:
        """This replica's own counters for a pod (the pod's counters minus the peers' part)."""
        ep = self.pool.get(address)
        if ep is None:
            return (0, 0, 0)
        a = self._applied.get(address)
        if a is None or a[0] is not ep:
            return (ep.inflight, ep.inflight_prefill_tokens, ep.inflight_decode_tokens)
        d = a[1]
        return (ep.inflight - d[0], ep.inflight_prefill_tokens - d[1], ep.inflight_decode_tokens - d[2])

    def peer_load(self, address: str) -> int:
        a = self._applied.get(address)
        ep = self.pool.get(address)
        return a[1][0] if a is not None and a[0] is ep else 0

    # ---------------------------------------------------------------- connection
    async def _connection_loop(self) -> None:
        import redis.asyncio as aioredis

        s = self.settings
        backoff = s.reconnect_min_s
        while True:
            pubsub = None
            try:
                r = aioredis.Redis.from_url(s.url, socket_connect_timeout=1.0, socket_keepalive=True)
                async with asyncio.timeout(2.0):  # not wait_for: on 3.11 it can swallow a racing cancel
                    await r.ping()
                pubsub = r.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.broadcast, self.own_channel)
                self._redis = r
                self.connected = True
                self.connects += 1
                backoff = s.reconnect_min_s
                self._published.clear()  # the next load message is a full one
                self._published_queued = -1
                log.info("replication connected", extra={"replica": self.replica_id, "url": s.url, "connects": self.connects})
                reader = asyncio.get_running_loop().create_task(self._read_loop(pubsub), name="replication-reader")
                writer = asyncio.get_running_loop().create_task(self._write_loop(r), name="replication-writer")
                try:
                    done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        t.result()  # raises the connection error
                finally:
                    for t in (reader, writer):
                        t.cancel()
                    for t in (reader, writer):
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await t
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: route on our own state, retry
                self.last_error = f"{type(e).__name__}: {e}"[:200]
                if self.connected:
                    log.warning("replication lost Redis; routing on local state", extra={"replica": self.replica_id, "error": self.last_error})
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                await self._close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, s.reconnect_max_s)

    # ---------------------------------------------------------------- outbound
    def _pack(self, msg: dict[str, Any]) -> bytes:
        return msgpack.packb(msg, use_bin_type=True)  # type: ignore[no-any-return]

    def _load_message(self, full: bool) -> dict[str, Any] | None:
        now = time.monotonic()
        tr = self.tracker
        if tr is not None and not full:
            changes = tr.changes
            if changes == self._seen_changes and now - self._last_scan < self.settings.token_refresh_s:
                flow = self.flow
                if (flow.queued() if flow is not None else 0) == self._published_queued:
                    return None
            self._seen_changes = changes
        elif tr is not None:
            self._seen_changes = tr.changes
        self._last_scan = now
        counts: dict[str, list[int]] = {}
        pub = self._published
        for ep in self.pool.snapshot():
            own = self.own_load(ep.address)
            if full or pub.get(ep.address) != own:
                counts[ep.address] = list(own)
                pub[ep.address] = own
        for addr in [a for a in pub if self.pool.get(a) is None]:
            del pub[addr]
        flow = self.flow
        queued = flow.queued() if flow is not None else 0
        if not counts and not full and queued == self._published_queued:
            return None
        self._published_queued = queued
        return {"t": _LOAD, "r": self.replica_id, "c": counts, "q": queued, "full": full}

    async def _write_loop(self, r: Any) -> None:
        s = self.settings
        ch = self.broadcast
        next_full = 0.0
        while True:
            now = time.monotonic()
            full = now >= next_full
            if full:
                next_full = now + s.heartbeat_s
            msgs: list[tuple[str, bytes]] = []
            m = self._load_message(full)
            if m is not None:
                msgs.append((ch, self._pack(m)))
            prefix = self._prefix_out
            taken_prefix: list[tuple[str, list[int]]] = []
            while prefix and len(taken_prefix) < 512:
                taken_prefix.append(prefix.popleft())
            if taken_prefix:
                msgs.append((ch, self._pack({"t": _PREFIX, "r": self.replica_id, "e": [list(e) for e in taken_prefix]})))
            kvq = self._kv_out
            taken_kv: list[list[Any]] = []
            while kvq and len(taken_kv) < 1024:
                taken_kv.append(kvq.popleft())
            if taken_kv:
                msgs.append((ch, self._pack({"t": _KV, "r": self.replica_id, "e": taken_kv})))
            taken_finish: dict[str, list[list[Any]]] = {}
            finish_at: dict[int, str] = {}  # index in msgs -> owner
            for owner, q in self._finish_out.items():
                if q:
                    batch = [q.popleft() for _ in range(min(len(q), 1024))]
                    taken_finish[owner] = batch
                    finish_at[len(msgs)] = owner
                    msgs.append((f"{s.namespace}:r:{owner}", self._pack({"t": _FINISH, "r": self.replica_id, "e": batch})))
            if msgs:
                try:
                    pipe = r.pipeline(transaction=False)
                    for c, data in msgs:
                        pipe.publish(c, data)
                    received = await pipe.execute()
                    self.sent += len(msgs)
                except Exception:
                    # keep what others still need; load state is re-sent in full after reconnecting
                    self._prefix_out.extendleft(reversed(taken_prefix))
                    self._kv_out.extendleft(reversed(taken_kv))
                    for owner, batch in taken_finish.items():
                        self._finish_out[owner].extendleft(reversed(batch))
                    raise
                if finish_at:
                    self._after_finish_publish(finish_at, received, taken_finish, now)
            await asyncio.sleep(s.interval_s)

    def _after_finish_publish(self, finish_at: dict[int, str], received: list[Any], taken: dict[str, list[list[Any]]], now: float) -> None:
        """Pub/sub delivers only to clients subscribed at that instant: a flight end published while its owner is
        not subscribed (it reconnects after a Redis outage a moment later than we do) would be lost and the flight
        stay counted. PUBLISH returns the number of receivers, so an end nobody received is queued again, for
        ``finish_retry_s`` at most (an owner that never comes back is dead; its flights went with it)."""
        for i, owner in finish_at.items():
            if int(received[i] or 0) > 0:
                if self._finish_undelivered.pop(owner, None) is not None:
                    self.finish_redelivered += 1
                continue
            since = self._finish_undelivered.setdefault(owner, now)
            if now - since <= self.settings.finish_retry_s:
                self._finish_out[owner].extendleft(reversed(taken[owner]))
            else:
                self.finish_dropped += len(taken[owner]) + len(self._finish_out[owner])
                self._finish_out[owner].clear()
                del self._finish_undelivered[owner]
                log.warning("replication dropped flight ends for an absent owner", extra={"replica": self.replica_id, "owner": owner})

    # ---------------------------------------------------------------- inbound
    async def _read_loop(self, pubsub: Any) -> None:
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            if msg.get("type") != "message":
                continue
            try:
                self.handle(msgpack.unpackb(msg["data"], raw=False, strict_map_key=False))
            except Exception:
                log.exception("replication message failed")

    def handle(self, m: dict[str, Any]) -> None:
        """Apply one message from a peer (public for tests)."""
        peer_id = m.get("r")
        if not isinstance(peer_id, str) or peer_id == self.replica_id:
            return
        self.received += 1
        kind = m.get("t")
        if kind == _BYE:
            self._drop_peer(peer_id)
            return
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = _Peer(time.monotonic())
            log.info("replication peer joined", extra={"replica": self.replica_id, "peer": peer_id})
        peer.last_seen = time.monotonic()
        if kind == _LOAD:
            counts = m.get("c") or {}
            changed: set[str] = set()
            for addr, v in counts.items():
                t = (int(v[0]), int(v[1]), int(v[2]))
                if peer.counts.get(addr) != t:
                    peer.counts[addr] = t
                    changed.add(addr)
            if m.get("full"):
                for addr in [a for a in peer.counts if a not in counts]:
                    del peer.counts[addr]
                    changed.add(addr)
            for addr in changed:
                self._sync_pod(addr)
            q = int(m.get("q") or 0)
            if q != peer.queued:
                peer.queued = q
                self._sync_queued()
        elif kind == _PREFIX:
            index = self.prefix_index
            if index is None:
                return
            for addr, hashes in m.get("e") or ():
                if self.pool.get(addr) is not None:
                    index.add_remote(hashes, addr)
        elif kind == _KV:
            kv = self.kv_index
            if kv is None:
                return
            for op in m.get("e") or ():
                if op[0] == "h":
                    _, hid, addr, keys, max_s = op
                    if self.pool.get(addr) is not None:
                        pid = f"{peer_id}/{hid}"
                        kv.hold(pid, addr, keys, float(max_s), notify=False)
                        peer.holds.add(pid)
                elif op[0] == "u":
                    pid = f"{peer_id}/{op[1]}"
                    kv.release(pid, notify=False)
                    peer.holds.discard(pid)
                elif op[0] == "s":
                    _, addr, keys, ttl = op
                    if self.pool.get(addr) is not None:
                        kv.add_speculative(addr, keys, float(ttl), notify=False)
        elif kind == _FINISH:
            al = self.access_log
            if al is None:
                return
            for entry in m.get("e") or ():
                if len(entry) >= 9:
                    key, status, outcome, end_wall, upstream_failure, first_wall, prefill_ms, chunks, tail = entry[:9]
                    al.finish_forwarded_observation(
                        key, int(status), str(outcome), float(end_wall), bool(upstream_failure), float(first_wall), float(prefill_ms), int(chunks), bytes(tail)
                    )
                else:
                    key, status, outcome, end_wall, upstream_failure = entry[:5]
                    al.finish_forwarded(key, int(status), str(outcome), float(end_wall), bool(upstream_failure))

    def _sync_pod(self, addr: str) -> None:
        """Make the pod's counters carry exactly the sum of the live peers' values for it."""
        ep = self.pool.get(addr)
        if ep is None:
            self._applied.pop(addr, None)
            return
        want = [0, 0, 0]
        for p in self.peers.values():
            c = p.counts.get(addr)
            if c is not None:
                want[0] += c[0]
                want[1] += c[1]
                want[2] += c[2]
        a = self._applied.get(addr)
        if a is None or a[0] is not ep:  # first time, or the pod left and came back as a new Endpoint
            a = (ep, [0, 0, 0])
            self._applied[addr] = a
        have = a[1]
        d = (want[0] - have[0], want[1] - have[1], want[2] - have[2])
        if d != (0, 0, 0):
            ep.add_peer_load(*d)
            a[1][:] = want

    def _sync_queued(self) -> None:
        flow = self.flow
        if flow is not None:
            flow.peer_queued = sum(p.queued for p in self.peers.values())

    def _drop_peer(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        self.dropped_peers += 1
        self.last_peer_drop = time.monotonic()
        if self.kv_index is not None:
            for pid in peer.holds:
                self.kv_index.release(pid, notify=False)
        for addr in peer.counts:
            self._sync_pod(addr)
        self._sync_queued()
        log.info("replication peer dropped", extra={"replica": self.replica_id, "peer": peer_id})

    async def _expire_loop(self) -> None:
        s = self.settings
        step = min(0.05, s.peer_ttl_s / 4)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for peer_id in [p for p, v in self.peers.items() if now - v.last_seen > s.peer_ttl_s]:
                self._drop_peer(peer_id)


class ReplicationCollector:
    """Prometheus gauges of one replica's shared state (``extproc_replication_*``)."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        s = self.shared
        yield GaugeMetricFamily("extproc_replication_connected", "1 while this replica is connected to the shared store", value=1.0 if s.connected else 0.0)
        yield GaugeMetricFamily("extproc_replication_peers", "Other scheduler replicas heard from within the peer TTL", value=float(len(s.peers)))
        yield GaugeMetricFamily("extproc_replication_connects", "Connections made to the shared store", value=float(s.connects))
        yield GaugeMetricFamily("extproc_replication_messages_sent", "Messages published", value=float(s.sent))
        yield GaugeMetricFamily("extproc_replication_messages_received", "Peer messages applied", value=float(s.received))
        yield GaugeMetricFamily("extproc_replication_peers_dropped", "Peers dropped (silent past the TTL, or stopped)", value=float(s.dropped_peers))
        st = s.status()
        yield GaugeMetricFamily("extproc_replication_buffered", "Prefix inserts, KV holds and flight ends waiting for the store",
                                value=float(st["buffered_prefix"] + st["buffered_kv"] + st["buffered_finish"]))


__all__ = ["ReplicationCollector", "KEY_SEPARATOR", "ReplicationSettings", "SharedState", "owner_of"]
