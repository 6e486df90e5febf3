"""The native HTTP/2 gRPC server, driven by an independent client (grpcio's): streaming both ways, flow control
with messages far beyond the default windows and frame size, errors as gRPC statuses, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from extproc.server.h2grpc import Call, Method, NativeGrpcServer

pytestmark = pytest.mark.timeout(60)

BV = wrappers_pb2.BytesValue


async def _echo(call: Call) -> None:
    """Bidi: answer every message with the same bytes reversed, until the client half-closes."""
    while True:
        m = await call.read()
        if m is grpc.aio.EOF:
            return
        if m.value == b"boom":
            raise RuntimeError("handler failure")
        await call.write(BV(value=m.value[::-1]))


async def _sum(call: Call) -> None:
    """Client streaming: one answer with the total length, after the client is done."""
    total = 0
    while (m := await call.read()) is not grpc.aio.EOF:
        total += len(m.value)
    await call.write(BV(value=str(total).encode()))


cancelled: list[bool] = []


async def _wait(call: Call) -> None:
    m = await call.read()  # the client cancels instead of sending
    cancelled.append(m is grpc.aio.EOF)


@pytest.fixture
async def server() -> Any:
    srv = NativeGrpcServer(
        {
            "/t.S/Echo": Method(BV.FromString, _echo),
            "/t.S/Sum": Method(BV.FromString, _sum),
            "/t.S/Wait": Method(BV.FromString, _wait),
        },
        max_message_bytes=4 * 1024 * 1024,
    )
    port = await srv.start("127.0.0.1", 0)
    yield port
    await srv.stop(0.5)


def _stub(ch: grpc.aio.Channel, name: str, kind: str) -> Any:
    make = getattr(ch, kind)
    return make(f"/t.S/{name}", request_serializer=BV.SerializeToString, response_deserializer=BV.FromString)


async def test_bidi_streams_many_messages_and_concurrent_calls(server: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as ch:
        echo = _stub(ch, "Echo", "stream_stream")

        async def one(k: int) -> list[bytes]:
            call = echo()
            out = []
            for i in range(20):
                await call.write(BV(value=f"{k}-{i}".encode()))
                out.append((await call.read()).value)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            return out

        results = await asyncio.gather(*(one(k) for k in range(16)))
        for k, out in enumerate(results):
            assert out == [f"{k}-{i}".encode()[::-1] for i in range(20)]


async def test_large_messages_cross_windows_and_frames(server: int) -> None:
    big = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB: > 64 KiB windows, > 16 KiB frames, both ways
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as ch:
        echo = _stub(ch, "Echo", "stream_stream")
        call = echo()
        for _ in range(3):
            await call.write(BV(value=big))
            assert (await call.read()).value == big[::-1]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        total = await _stub(ch, "Sum", "stream_unary")(iter([BV(value=big), BV(value=b"x" * 10)]))
        assert total.value == str(len(big) + 10).encode()


async def test_errors_are_grpc_statuses(server: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/t.S/Nope", request_serializer=BV.SerializeToString, response_deserializer=BV.FromString)(BV())
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = _stub(ch, "Echo", "stream_stream")()
        await call.write(BV(value=b"boom"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.UNKNOWN
        call = _stub(ch, "Echo", "stream_stream")()
        with pytest.raises(grpc.aio.AioRpcError):
            await call.write(BV(value=b"y" * (5 * 1024 * 1024)))  # over max_message_bytes
            await call.read()
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the connection still serves calls afterwards
        ok = _stub(ch, "Echo", "stream_stream")()
        await ok.write(BV(value=b"ab"))
        assert (await ok.read()).value == b"ba"
        await ok.done_writing()
        assert await ok.code() == grpc.StatusCode.OK


async def test_client_cancel_ends_the_handler_read_with_eof(server: int) -> None:
    cancelled.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as ch:
        call = _stub(ch, "Wait", "stream_stream")()
        await asyncio.sleep(0.2)  # the server has the stream and waits in read()
        call.cancel()
        for _ in range(50):
            if cancelled:
                break
            await asyncio.sleep(0.02)
    assert cancelled == [True]
