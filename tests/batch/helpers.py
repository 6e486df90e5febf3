"""A gateway stack for the batch tests: simulated fleet (its own process) + scheduler + real Envoy routing
/v1/files and /v1/batches to ``extproc batch serve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.harness import BatchServerProcess, Stack, StackSpec, start_sim_process, stop_process
from extproc.netutil import free_port

MODEL = "sim-llama"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Gateway:
    url: str  # Envoy
    metrics_url: str  # the scheduler's
    batch_port: int
    batch: BatchServerProcess | None
    store: str

    async def start_batch(self, *args: str, store: str | None = None, port: int | None = None) -> BatchServerProcess:
        return await BatchServerProcess.start(self.url, store or self.store, port=self.batch_port if port is None else port, args=list(args))


@contextlib.asynccontextmanager
async def gateway(*, time_scale: float = 0.02, pods: int = 2, batch_args: tuple[str, ...] = (), store: str | None = None, start_batch: bool = True, config: str = "batch-interactive") -> AsyncIterator[Gateway]:
    sim, info = await start_sim_process(["--pods", str(pods), "--model", MODEL, "--time-scale", str(time_scale), "--seed", "3"])
    bport = free_port()
    try:
        async with Stack(StackSpec(endpoints=info["endpoints"], config=config, models=[MODEL], envoy_args={"batch": f"127.0.0.1:{bport}"})) as st:
            assert st.metrics_url
            gw = Gateway(st.url, st.metrics_url, bport, None, store or tempfile.mkdtemp(prefix="batch-store-"))
            if start_batch:
                gw.batch = await gw.start_batch("--lease", "2", *batch_args)
            try:
                yield gw
            finally:
                if gw.batch is not None:
                    await gw.batch.stop()
    finally:
        await stop_process(sim)


def jsonl(n: int, *, start: int = 0, max_tokens: int = 4, bad_model_every: int = 0, prefix: str = "r") -> bytes:
    systems = [f"You are assistant number {g}. " + "Follow the rules carefully. " * 20 for g in range(4)]
    out = []
    for i in range(start, start + n):
        model = "no-such-model" if bad_model_every and i % bad_model_every == 0 else MODEL
        body = {"model": model, "messages": [{"role": "system", "content": systems[i % 4]}, {"role": "user", "content": f"question {i}"}], "max_tokens": max_tokens}
        out.append(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(out) + "\n").encode()


async def wait_status(client: Any, batch_id: str, statuses: tuple[str, ...] = TERMINAL, timeout_s: float = 120.0, pred: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        b = await client.batches.retrieve(batch_id)
        if b.status in statuses or (pred is not None and pred(b)):
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} {b.request_counts} after {timeout_s}s")
        await asyncio.sleep(0.2)


def ids_of(text: str) -> list[str]:
    return [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]


async def metric_sum(url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total
