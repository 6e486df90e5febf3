"""A small gRPC-over-HTTP/2 server on asyncio for the ext_proc hot path (``--grpc-server native``).

Why: with grpcio's asyncio server the scheduler spent ~400 µs of CPU per ext_proc stream, almost all of it
in grpc.aio's per-call machinery (thread hand-offs between gRPC's EventEngine, its poller and the event loop;
docs/benchmarks.md "Overhead"). Envoy is the only client: it opens one HTTP/2 connection per worker and one
stream per HTTP request. This server parses HTTP/2 frames itself on the event loop thread (no threads, one
``data_received`` per batch of frames, one write per loop iteration), decodes the few HEADERS frames with
``hpack`` and leaves message parsing to the upb-backed protobuf classes.

Scope (what Envoy's gRPC client needs; anything else gets a protocol-level refusal, never a hang):

- prior-knowledge cleartext HTTP/2 (h2c), the connection preface, SETTINGS / PING / WINDOW_UPDATE /
  RST_STREAM / GOAWAY / PRIORITY, HEADERS + CONTINUATION, padded frames;
- unary, client-, server- and bidirectional-streaming methods; a handler gets a ``Call`` with ``read()``
  (message, or ``grpc.aio.EOF`` when the client half-closed or reset the stream) and ``write()``, the same two
  calls ``ExtProcHandler.Process`` uses on grpcio's ``ServicerContext``, so one handler serves both servers;
- flow control both ways: we advertise 2³¹−1 stream windows and top the connection window up as we consume;
  we honour Envoy's windows and max frame size when sending (large body mutations are split and queued);
- per-message size limit (RESOURCE_EXHAUSTED), unknown method (UNIMPLEMENTED), handler exception (UNKNOWN);
- graceful stop: GOAWAY, wait for in-flight streams up to a grace period, then close.

Not supported (use ``--grpc-server grpcio``): TLS, compression (Envoy sends none), HTTP/1.1 upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from hpack import Decoder

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# settings ids
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, _, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = range(9)
# gRPC status codes used here
OK, UNKNOWN, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE = 0, 2, 8, 12, 14

MAX_WINDOW = 2**31 - 1
OUR_MAX_FRAME = 1 << 20  # what we accept; Envoy sends at most this per DATA frame
_HDR = struct.Struct(">I")

EOF = grpc.aio.EOF


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, ftype, flags)) + _HDR.pack(stream_id & MAX_WINDOW) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman: stateless for the peer's table."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# :status 200 is static-table index 8 (indexed field, 0x88); content-type is written as a literal.
RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")


def _trailers(code: int, message: str = "") -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if message:
        # grpc-message is percent-encoded; keep it to safe ASCII
        safe = "".join(c if 0x20 <= ord(c) < 0x7F and c != "%" else f"%{ord(c) & 0xFF:02X}" for c in message[:200])
        block += _literal(b"grpc-message", safe.encode())
    return block


_OK_TRAILERS = _trailers(OK)


@dataclass(slots=True, frozen=True)
class Method:
    """One gRPC method: how to parse its request messages and the coroutine that serves a call."""

    parse: Callable[[bytes], Any]
    handler: Callable[[Call], Awaitable[None]]


class Call:
    """One gRPC call (HTTP/2 stream). ``read()`` → the next request message or ``grpc.aio.EOF``;
    ``write(msg)`` sends one response message."""

    __slots__ = ("_conn", "stream_id", "method", "_inbox", "_waiter", "_remote_closed", "_reset", "_headers_sent",
                 "_closed", "_buf", "_send_window", "_task", "headers")  # fmt: skip

    def __init__(self, conn: H2Connection, stream_id: int, method: Method, headers: dict[str, str]) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.method = method
        self.headers = headers
        self._inbox: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._remote_closed = False
        self._reset = False
        self._headers_sent = False
        self._closed = False  # we sent END_STREAM (or gave up on the stream)
        self._buf = bytearray()  # partial gRPC message bytes
        self._send_window = conn.peer_initial_window
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ handler side
    async def read(self) -> Any:
        while not self._inbox:
            if self._remote_closed or self._reset:
                return EOF
            fut = self._waiter = self._conn.loop.create_future()
            try:
                await fut
            finally:
                self._waiter = None
        return self._inbox.popleft()

    async def write(self, message: Any) -> None:
        if self._reset or self._closed:
            return
        data = message.SerializeToString()
        payload = b"\x00" + _HDR.pack(len(data)) + data
        conn = self._conn
        if not self._headers_sent:
            self._headers_sent = True
            conn.send_headers(self.stream_id, RESPONSE_HEADERS, end_stream=False)
        await conn.send_data(self, payload)

    def cancelled(self) -> bool:
        return self._reset

    # ------------------------------------------------------------------ connection side
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_data(self, data: bytes | memoryview, end_stream: bool) -> bool:
        """Append DATA; push complete messages. False when a message exceeds the size limit."""
        buf = self._buf
        buf += data
        limit = self._conn.server.max_message_bytes
        pushed = False
        while len(buf) >= 5:
            n = _HDR.unpack_from(buf, 1)[0]
            if n > limit:
                return False
            if len(buf) < 5 + n:
                break
            if buf[0]:
                raise ValueError("compressed gRPC messages are not supported")
            self._inbox.append(self.method.parse(bytes(buf[5 : 5 + n])))
            del buf[: 5 + n]
            pushed = True
        if end_stream:
            self._remote_closed = True
        if pushed or end_stream:
            self._wake()
        return True


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy."""

    def __init__(self, server: NativeGrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._in = bytearray()
        self._preface_ok = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._decoder = Decoder()
        self.streams: dict[int, Call] = {}
        self._last_stream = 0
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self._conn_send_window = 65535
        self._recv_unacked = 0
        self._blocked: deque[tuple[Call, memoryview, asyncio.Future[None] | None]] = deque()
        self._hdr_stream = 0  # stream whose HEADERS awaits CONTINUATION
        self._hdr_block = bytearray()
        self._hdr_end_stream = False
        self._goaway_sent = False
        self.closed = asyncio.Event()

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        settings = struct.pack(">HIHIHI", S_INITIAL_WINDOW_SIZE, MAX_WINDOW, S_MAX_FRAME_SIZE, OUR_MAX_FRAME, S_ENABLE_PUSH, 0)
        if self.server.max_concurrent_streams:
            settings += struct.pack(">HI", S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams)
        self._queue(_frame(SETTINGS, 0, 0, settings))
        self._queue(_frame(WINDOW_UPDATE, 0, 0, _HDR.pack(MAX_WINDOW - 65535)))
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for call in list(self.streams.values()):
            call._reset = True
            call._wake()
        self.streams.clear()
        for _, _, fut in self._blocked:
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._blocked.clear()
        self.transport = None
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        try:
            if not self._preface_ok:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError("not an HTTP/2 prior-knowledge client")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionError("bad HTTP/2 connection preface")
                del buf[: len(PREFACE)]
                self._preface_ok = True
            pos = 0
            end = len(buf)
            mv = memoryview(buf)
            try:
                while end - pos >= 9:
                    length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                    if length > OUR_MAX_FRAME:
                        raise ConnectionError(f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE")
                    if end - pos < 9 + length:
                        break
                    ftype = buf[pos + 3]
                    flags = buf[pos + 4]
                    sid = _HDR.unpack_from(buf, pos + 5)[0] & MAX_WINDOW
                    self._on_frame(ftype, flags, sid, mv[pos + 9 : pos + 9 + length])
                    pos += 9 + length
            finally:
                mv.release()
            if pos:
                del buf[:pos]
        except ConnectionError as e:
            log.warning("h2 connection error", extra={"error": str(e)})
            self._goaway(PROTOCOL_ERROR)
        except Exception:
            log.exception("h2 connection failed")
            self._goaway(INTERNAL_ERROR)

    # ------------------------------------------------------------------ frames in
    def _on_frame(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self._hdr_stream and ftype != CONTINUATION:
            raise ConnectionError("expected CONTINUATION")
        if ftype == DATA:
            self._on_data_frame(flags, sid, payload)
        elif ftype == HEADERS:
            if sid == 0 or sid % 2 == 0:
                raise ConnectionError("HEADERS on an invalid stream id")
            p = 0
            pad = 0
            if flags & PADDED:
                pad = payload[0]
                p = 1
            if flags & PRIORITY_FLAG:
                p += 5
            block = payload[p : len(payload) - pad]
            if flags & END_HEADERS:
                self._on_headers(sid, bytes(block), bool(flags & END_STREAM))
            else:
                self._hdr_stream = sid
                self._hdr_block = bytearray(block)
                self._hdr_end_stream = bool(flags & END_STREAM)
        elif ftype == CONTINUATION:
            if sid != self._hdr_stream:
                raise ConnectionError("CONTINUATION on the wrong stream")
            self._hdr_block += payload
            if flags & END_HEADERS:
                self._hdr_stream = 0
                self._on_headers(sid, bytes(self._hdr_block), self._hdr_end_stream)
                self._hdr_block = bytearray()
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            self._on_settings(payload)
        elif ftype == WINDOW_UPDATE:
            inc = _HDR.unpack_from(payload, 0)[0] & MAX_WINDOW
            if sid == 0:
                self._conn_send_window += inc
            else:
                call = self.streams.get(sid)
                if call is not None:
                    call._send_window += inc
            self._unblock()
        elif ftype == PING:
            if not flags & ACK:
                self._queue(_frame(PING, ACK, 0, bytes(payload)))
        elif ftype == RST_STREAM:
            call = self.streams.pop(sid, None)
            if call is not None:
                call._reset = True
                call._wake()
        elif ftype == GOAWAY:
            self.server._draining_conns.add(self)
        elif ftype == PUSH_PROMISE:
            raise ConnectionError("PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §4.1, §5.5)

    def _on_settings(self, payload: memoryview) -> None:
        for i in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError("SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.streams.values():
                    call._send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif key == S_HEADER_TABLE_SIZE:
                pass  # we never index our own headers: the peer's decoder table size does not matter
        self._queue(_frame(SETTINGS, ACK, 0))
        self._unblock()

    def _on_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        headers = self._decoder.decode(block)  # keeps the HPACK table in sync even for trailers we ignore
        call = self.streams.get(sid)
        if call is not None:  # request trailers: the client is done
            call._remote_closed = True
            call._wake()
            return
        if sid <= self._last_stream:
            return  # a frame for a stream we already closed
        self._last_stream = sid
        if self._goaway_sent:
            self._queue(_frame(RST_STREAM, 0, sid, _HDR.pack(REFUSED_STREAM)))
            return
        hdrs = {k if isinstance(k, str) else k.decode(): v if isinstance(v, str) else v.decode() for k, v in headers}
        path = hdrs.get(":path", "")
        method = self.server.methods.get(path)
        if method is None:
            self.send_headers(sid, RESPONSE_HEADERS + _trailers(UNIMPLEMENTED, f"unknown method {path}"), end_stream=True)
            return
        mcs = self.server.max_concurrent_streams
        if mcs and len(self.streams) >= mcs:
            self._queue(_frame(RST_STREAM, 0, sid, _HDR.pack(REFUSED_STREAM)))
            return
        call = Call(self, sid, method, hdrs)
        if end_stream:
            call._remote_closed = True
        self.streams[sid] = call
        call._task = self.loop.create_task(self._serve(call))

    def _on_data_frame(self, flags: int, sid: int, payload: memoryview) -> None:
        n = len(payload)
        if flags & PADDED:
            pad = payload[0]
            payload = payload[1 : n - pad]
        self._recv_unacked += n
        if self._recv_unacked >= (1 << 30):
            self._queue(_frame(WINDOW_UPDATE, 0, 0, _HDR.pack(self._recv_unacked)))
            self._recv_unacked = 0
        call = self.streams.get(sid)
        if call is None or call._remote_closed:
            return
        if not call._on_data(payload, bool(flags & END_STREAM)):
            self._end_call(call, RESOURCE_EXHAUSTED, "received message larger than max")
            # response complete before the request: RST_STREAM NO_ERROR tells the client to stop sending (RFC 9113 8.1)
            self._queue(_frame(RST_STREAM, 0, sid, _HDR.pack(NO_ERROR)))
            call._reset = True
            call._wake()

    # ------------------------------------------------------------------ serving a call
    async def _serve(self, call: Call) -> None:
        code, message = OK, ""
        try:
            await call.method.handler(call)
        except asyncio.CancelledError:
            code, message = UNAVAILABLE, "server stopping"
        except Exception as e:
            log.exception("gRPC handler failed", extra={"stream": call.stream_id})
            code, message = UNKNOWN, f"{type(e).__name__}"
        self._end_call(call, code, message)

    def _end_call(self, call: Call, code: int, message: str = "") -> None:
        if call._closed or call._reset:
            self.streams.pop(call.stream_id, None)
            return
        call._closed = True
        block = _OK_TRAILERS if code == OK and not message else _trailers(code, message)
        if not call._headers_sent:
            call._headers_sent = True
            block = RESPONSE_HEADERS + block  # trailers-only response
        if any(c is call for c, _, _ in self._blocked):
            # data still waits for window: send trailers after it
            self._blocked.append((call, memoryview(b"\x00H" + block), None))
        else:
            self.send_headers(call.stream_id, block, end_stream=True)
        # we are done; whatever the client still sends on this stream is ignored
        self.streams.pop(call.stream_id, None)

    # ------------------------------------------------------------------ frames out
    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def send_headers(self, sid: int, block: bytes, *, end_stream: bool) -> None:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        mf = self.peer_max_frame
        if len(block) <= mf:
            self._queue(_frame(HEADERS, flags, sid, block))
            return
        first, rest = block[:mf], block[mf:]
        self._queue(_frame(HEADERS, flags & END_STREAM, sid, first))
        while rest:
            chunk, rest = rest[:mf], rest[mf:]
            self._queue(_frame(CONTINUATION, END_HEADERS if not rest else 0, sid, chunk))

    async def send_data(self, call: Call, payload: bytes) -> None:
        n = len(payload)
        if not self._blocked and n <= self._conn_send_window and n <= call._send_window and n <= self.peer_max_frame:
            self._conn_send_window -= n
            call._send_window -= n
            self._queue(_frame(DATA, 0, call.stream_id, payload))
            return
        fut = self.loop.create_future()
        self._blocked.append((call, memoryview(payload), fut))
        self._unblock()
        await fut

    def _unblock(self) -> None:
        """Send queued DATA as far as the windows allow (FIFO across streams)."""
        while self._blocked:
            call, mv, fut = self._blocked[0]
            if call._reset or self.transport is None:
                self._blocked.popleft()
                if fut is not None and not fut.done():
                    fut.set_result(None)
                continue
            if fut is None:  # deferred trailers
                self._blocked.popleft()
                self.send_headers(call.stream_id, bytes(mv[2:]), end_stream=True)
                continue
            while len(mv):
                n = min(len(mv), self._conn_send_window, call._send_window, self.peer_max_frame)
                if n <= 0:
                    return
                self._conn_send_window -= n
                call._send_window -= n
                self._queue(_frame(DATA, 0, call.stream_id, bytes(mv[:n])))
                mv = mv[n:]
                self._blocked[0] = (call, mv, fut)
            self._blocked.popleft()
            if not fut.done():
                fut.set_result(None)

    def _goaway(self, code: int) -> None:
        if self.transport is None:
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            self._queue(_frame(GOAWAY, 0, 0, _HDR.pack(self._last_stream) + _HDR.pack(code)))
        if code != NO_ERROR:
            self._flush()
            self.transport.close()

    def start_drain(self) -> None:
        self._goaway(NO_ERROR)


class NativeGrpcServer:
    """Serves ``methods`` (``"/pkg.Service/Method"`` → :class:`Method`) over cleartext HTTP/2."""

    def __init__(self, methods: dict[str, Method], *, max_message_bytes: int = 4 * 1024 * 1024, max_concurrent_streams: int = 0) -> None:
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self._server: asyncio.Server | None = None
        self._connections: set[H2Connection] = set()
        self._draining_conns: set[H2Connection] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: H2Connection(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for c in conns:
            c.start_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.streams for c in conns) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for c in conns:
            for call in list(c.streams.values()):
                if call._task is not None:
                    call._task.cancel()
            if c.transport is not None:
                c._flush()
                c.transport.close()
        for c in conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(c.closed.wait(), 1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


__all__ = ["Call", "Method", "NativeGrpcServer"]
