"""BUFFERED vs streamed request bodies: scheduler cost per request over real gRPC (in-process server).

BUFFERED: Envoy sends the whole body in one request_body message (we answer once).
STREAMED/full-duplex with our own buffering: one message per chunk (Envoy forwards ~16 KiB chunks), each
answered (or, in full-duplex, at least received) before the routing answer.

    .venv/bin/python benchmarks/body_mode.py [--sizes 4096,204800] [--n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.datalayer.endpoint import PodMetrics
from extproc.server.app import SchedulerServer, ServeOptions


def headers(path: str) -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    for k, v in ((":path", path), (":method", "POST"), ("content-type", "application/json")):
        h = r.request_headers.headers.headers.add()
        h.key, h.raw_value = k, v.encode()
    return r


def body(data: bytes, end: bool) -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    r.request_body.body = data
    r.request_body.end_of_stream = end
    return r


async def one(stub: pb_grpc.ExternalProcessorStub, raw: bytes, chunk: int | None) -> float:
    t0 = time.perf_counter()
    call = stub.Process()
    await call.write(headers("/v1/completions"))
    await call.read()
    if chunk is None:
        await call.write(body(raw, True))
        await call.read()
    else:
        parts = [raw[i : i + chunk] for i in range(0, len(raw), chunk)]
        for i, p in enumerate(parts):
            await call.write(body(p, i == len(parts) - 1))
            await call.read()
    await call.done_writing()
    await call.code()
    return time.perf_counter() - t0


async def main(sizes: list[int], n: int) -> None:
    pods = [f"127.0.0.1:{p}" for p in range(20001, 20009)]
    s = SchedulerServer(ServeOptions(endpoints=pods, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, scrape_interval_s=3600, max_body_bytes=1 << 22))
    await s.start()
    for ep in s.pool.snapshot():
        ep.metrics = PodMetrics(waiting=1, running=2, kv_usage=0.3, updated_at=time.monotonic())
    print(f"{'body':>8} {'mode':>10} {'msgs':>5} {'p50 ms':>8} {'p90 ms':>8}  (scheduler + client in one process, same loop)")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            for size in sizes:
                raw = json.dumps({"model": "m", "prompt": "x" * max(1, size - 40), "max_tokens": 8}).encode()
                res: dict[str, list[float]] = {"buffered": [], "streamed": []}
                for i in range(n):  # interleaved so drift cancels out
                    res["buffered"].append(await one(stub, raw, None))
                    res["streamed"].append(await one(stub, raw, 16384))
                for mode, v in res.items():
                    msgs = 2 if mode == "buffered" else 1 + -(-len(raw) // 16384)
                    v.sort()
                    print(f"{len(raw):>8} {mode:>10} {msgs:>5} {statistics.median(v) * 1e3:>8.3f} {v[int(0.9 * len(v))] * 1e3:>8.3f}")
                b, st = statistics.median(res["buffered"]), statistics.median(res["streamed"])
                print(f"{'':>8} {'ratio':>10} {'':>5} streamed/buffered p50 = {st / b:.2f}x")
    finally:
        await s.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,65536,204800")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    import uvloop

    uvloop.run(main([int(x) for x in a.sizes.split(",")], a.n))
