"""Calibrate a simulator ``Profile`` against real vLLM servers, and launch those servers.

``extproc sim calibrate --target URL [--target URL2] --out profile.yaml [--report FILE]``

1. **Design.** A training request set spans prompt lengths × output lengths × concurrency levels × prefix-cache
   hit/miss. Prompts are token-id lists (``/v1/completions`` accepts them), so prompt lengths and shared prefixes
   are exact and no tokenizer is involved; ``ignore_eos`` + ``min_tokens`` pin the output length.
2. **Measure.** Every request streams; the client records send time, first-token time and end time.
3. **Fit.** Each request gives two linear equations in the engine step model the simulator uses
   (``step = b0 + b1·uncached prefill tokens + b2·decoding sequences + a0·admitted requests``, see
   ``extproc.sim.engine``), with the regressors reconstructed from the client-side timeline of all requests:

   - TTFT ≈ a0·(requests admitted up to its first token) + b0·(steps: its own prefill step, plus half a step of
     waiting when the engine was busy) + b1·(uncached prompt tokens prefilled with or before it)
     + b2·(sequences decoding alongside its prefill);
   - decode time (e2e − TTFT) ≈ b0·(out − 1) + b2·Σ batch size over its decode steps (time-weighted mean
     decoding concurrency × (out − 1)) + b1·(prompt tokens of requests prefilled meanwhile) + a0·(their count).

   Rows are scaled by 1/target (relative least squares, ``numpy.linalg.lstsq``); coefficients that come out
   negative are dropped and the rest refitted. ``block_size`` and ``num_gpu_blocks`` come from the server's
   ``vllm:cache_config_info``, ``max_model_len`` from ``/v1/models``.
4. **Validate.** A held-out request set (other lengths, other concurrency levels) runs against the real server
   and against a simulated pod running the fitted profile; the report gives median and p90 relative errors
   of TTFT and e2e latency, per request and per cell.

This module also holds the real-vLLM launcher used by ``tests/real_vllm`` and by ``--launch``: it starts
``vllm.entrypoints.openai.api_server`` from the venv made by ``scripts/real_vllm_setup.sh`` on free ports, with
KV events on, waits for ``/health`` and kills the whole process group on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from extproc.netutil import free_ports
from extproc.sse import DONE, data_payloads

if TYPE_CHECKING:
    import aiohttp

    from extproc.sim.profiles import Profile

logger = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
VENV_ENV: Final = "REAL_VLLM_VENV"
SETUP_STAMP: Final = ".real_vllm_setup.stamp"
SETUP_SCRIPT: Final = REPO_ROOT / "scripts" / "real_vllm_setup.sh"

# ---------------------------------------------------------------------------------------------------------------
# Real vLLM launcher
# ---------------------------------------------------------------------------------------------------------------


def vllm_venv() -> Path:
    """Where ``scripts/real_vllm_setup.sh`` puts the vLLM CPU venv (``$REAL_VLLM_VENV`` overrides)."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else REPO_ROOT / ".venv-vllm"


def vllm_python() -> Path | None:
    """The venv's interpreter, or None when the venv is absent or its setup did not finish."""
    venv = vllm_venv()
    py = venv / "bin" / "python"
    return py if py.exists() and (venv / SETUP_STAMP).exists() else None


@dataclass(slots=True)
class VllmLaunchSpec:
    """How to start one real vLLM CPU server on the tiny model (flags known to work, reference/vllm.md)."""

    model_dir: Path
    served_model_name: str = "tiny"
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    num_gpu_blocks: int | None = None  # --num-gpu-blocks-override (>= 17 with max-model-len 2048)
    kv_events: bool = True
    enable_lora: bool = False
    cpu_core: int | None = None  # VLLM_CPU_OMP_THREADS_BIND; None = by server index over the allowed cores
    kvcache_space_gib: int = 1
    startup_timeout_s: float = 180.0
    extra_args: tuple[str, ...] = ()


@dataclass(slots=True)
class VllmServer:
    """A running real vLLM server. ``stop()`` kills its process group."""

    name: str
    port: int
    url: str
    kv_endpoint: str | None  # where to connect a SUB socket (vLLM binds tcp://*:port)
    kv_replay_endpoint: str | None  # ROUTER for replaying buffered batches
    kv_topic: str
    process: asyncio.subprocess.Process
    log_path: Path
    startup_s: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def stop(self, timeout_s: float = 15.0) -> None:
        proc = self.process
        if proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), wait)
                break
            except TimeoutError:
                continue
        # the API server forks an engine core in the same group; make sure nothing of the group survives
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


async def _wait_healthy(server: VllmServer, timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            if server.process.returncode is not None:
                raise RuntimeError(
                    f"vLLM {server.name} exited with {server.process.returncode} while starting; log tail:\n"
                    f"{server.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(server.url + "/health") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM {server.name} not healthy after {timeout_s:.0f} s; log tail:\n{server.log_tail()}"
                )
            await asyncio.sleep(0.5)


async def launch_vllm(spec: VllmLaunchSpec, *, name: str, index: int, workdir: Path) -> VllmServer:
    """Start one real vLLM server and wait until ``/health`` answers; on failure nothing is left running."""
    py = vllm_python()
    if py is None:
        raise RuntimeError(f"no real vLLM venv at {vllm_venv()}; run {SETUP_SCRIPT}")
    port, kv_port, replay_port = free_ports(3)
    topic = f"kv@{name}@{spec.served_model_name}"
    args = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(spec.model_dir),
        "--served-model-name", spec.served_model_name,
        "--load-format", "dummy",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(spec.max_model_len),
        "--enable-prefix-caching",
        "--dtype", "bfloat16",
        "--max-num-seqs", str(spec.max_num_seqs),
        "--max-num-batched-tokens", str(spec.max_num_batched_tokens),
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if spec.num_gpu_blocks is not None:
        args += ["--num-gpu-blocks-override", str(spec.num_gpu_blocks)]
    if spec.kv_events:
        cfg = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{kv_port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": topic,
        }
        args += ["--kv-events-config", json.dumps(cfg)]
    if spec.enable_lora:
        args += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"]
    args += list(spec.extra_args)

    cores = _allowed_cores()
    core = spec.cpu_core if spec.cpu_core is not None else cores[index % len(cores)]
    cache_root = workdir / f"{name}-cache"
    cache_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(spec.kvcache_space_gib),
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CACHE_ROOT=str(cache_root),
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
        TMPDIR=str(workdir),
    )
    log_path = workdir / f"{name}.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(workdir),
            env=env,
            start_new_session=True,  # own process group: stop() kills the engine core too
        )
    server = VllmServer(
        name=name,
        port=port,
        url=f"http://127.0.0.1:{port}",
        kv_endpoint=f"tcp://127.0.0.1:{kv_port}" if spec.kv_events else None,
        kv_replay_endpoint=f"tcp://127.0.0.1:{replay_port}" if spec.kv_events else None,
        kv_topic=topic,
        process=proc,
        log_path=log_path,
    )
    try:
        await _wait_healthy(server, spec.startup_timeout_s)
    except BaseException:
        await server.stop()
        raise
    server.startup_s = time.monotonic() - t0
    logger.info("real vLLM %s healthy at %s after %.1f s (core %d)", name, server.url, server.startup_s, core)
    return server


@contextlib.asynccontextmanager
async def real_vllm_servers(
    specs: Sequence[VllmLaunchSpec], *, workdir: Path | None = None, name_prefix: str = "vllm"
) -> AsyncIterator[list[VllmServer]]:
    """Start one server per spec (in parallel) and stop all of them on exit, whatever happens."""
    with contextlib.ExitStack() as stack:
        wd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="real-vllm-")))
        wd.mkdir(parents=True, exist_ok=True)
        tasks = [
            asyncio.ensure_future(launch_vllm(s, name=f"{name_prefix}-{i}", index=i, workdir=wd))
            for i, s in enumerate(specs)
        ]
        servers: list[VllmServer] = []
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            servers = [r for r in results if isinstance(r, VllmServer)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            yield servers
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:
                if t.done() and not t.cancelled() and isinstance(t.result(), VllmServer):
                    srv = t.result()
                    if srv not in servers:
                        servers.append(srv)
            await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


# ---------------------------------------------------------------------------------------------------------------
# Request design and measurement
# ---------------------------------------------------------------------------------------------------------------

TOKEN_ID_LOW: Final = 16  # above the tiny tokenizer's special tokens
TOKEN_ID_HIGH: Final = 2000  # below the tiny vocab (2443) and the simulator's


@dataclass(slots=True)
class CalRequest:
    key: str
    cell: str  # design cell, e.g. "c4/p512/o64/hit"
    prompt: list[int]
    max_tokens: int
    cached_tokens: int  # expected prefix-cache hit (full blocks, at most prompt - 1 tokens)


@dataclass(slots=True)
class Wave:
    """Requests sent by ``len(lanes)`` concurrent clients; each lane sends its requests one after another."""

    name: str
    lanes: list[list[CalRequest]]


@dataclass(slots=True)
class Sample:
    req: CalRequest
    t_send: float
    t_first: float
    t_end: float
    prompt_tokens: int
    completion_tokens: int
    first_chunk_tokens: int = 1  # >1 when the server coalesced tokens (its frontend fell behind): TTFT is late
    chunks: int = 0

    @property
    def clean_first(self) -> bool:
        """Whether the first-token time is trustworthy: one token in the first chunk, and the tokens did not
        all arrive in one burst at the end (the client or the server frontend was starved of CPU meanwhile;
        no engine decodes a token in under 0.2 ms)."""
        if self.first_chunk_tokens > 1:
            return False
        n = self.completion_tokens - 1
        return n <= 0 or self.decode / n >= 0.0002

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_send

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_send

    @property
    def decode(self) -> float:
        return self.t_end - self.t_first


class _Rng:
    """SplitMix64 (deterministic across Python versions)."""

    __slots__ = ("s",)

    def __init__(self, seed: int) -> None:
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def u64(self) -> int:
        self.s = (self.s + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.u64() % n

    def tokens(self, n: int) -> list[int]:
        span = TOKEN_ID_HIGH - TOKEN_ID_LOW
        return [TOKEN_ID_LOW + self.below(span) for _ in range(n)]


def _cached(shared_prefix: int, prompt_len: int, block_size: int) -> int:
    return (min(shared_prefix, prompt_len - 1) // block_size) * block_size


def design(
    *,
    seed: int,
    block_size: int,
    serial_prompts: Sequence[int],
    serial_outputs: Sequence[int],
    concurrency: Sequence[int],
    conc_prompts: Sequence[int],
    conc_outputs: Sequence[int],
    rounds: int,
    hit_every: int,
) -> list[Wave]:
    """Build the waves: a serial sweep (prompt × output, each miss then an exact repeat = hit) and, per
    concurrency level, closed-loop lanes cycling through prompt/output lengths where every ``hit_every``-th
    request repeats the lane's previous prompt with a fresh tail (prefix hit)."""
    rng = _Rng(seed)
    waves: list[Wave] = []
    lane: list[CalRequest] = []
    for p in serial_prompts:
        for o in serial_outputs:
            prompt = rng.tokens(p)
            lane.append(CalRequest(f"s-{len(lane)}", f"c1/p{p}/o{o}/miss", prompt, o, 0))
            lane.append(CalRequest(f"s-{len(lane)}", f"c1/p{p}/o{o}/hit", list(prompt), o, _cached(p, p, block_size)))
    waves.append(Wave("serial", [lane]))
    for c in concurrency:
        lanes: list[list[CalRequest]] = []
        for li in range(c):
            lane = []
            prev: list[int] | None = None
            for r in range(rounds):
                p = conc_prompts[(li + r) % len(conc_prompts)]
                o = conc_outputs[(li * 7 + r) % len(conc_outputs)]
                if prev is not None and hit_every > 0 and r % hit_every == hit_every - 1:
                    shared = min(len(prev), p - 1)
                    prompt = prev[:shared] + rng.tokens(p - shared)
                    cached, kind = _cached(shared, p, block_size), "hit"
                else:
                    prompt, cached, kind = rng.tokens(p), 0, "miss"
                lane.append(CalRequest(f"c{c}-{li}-{r}", f"c{c}/p{p}/o{o}/{kind}", prompt, o, cached))
                prev = prompt
            lanes.append(lane)
        waves.append(Wave(f"c{c}", lanes))
    return waves


def training_design(block_size: int, seed: int = 1) -> list[Wave]:
    return design(
        seed=seed,
        block_size=block_size,
        serial_prompts=(32, 256, 768, 1536),
        serial_outputs=(4, 32, 128),
        concurrency=(2, 4, 8),
        conc_prompts=(64, 512, 1024),
        conc_outputs=(16, 64, 128),
        rounds=4,
        hit_every=2,
    )


def heldout_design(block_size: int, seed: int = 2) -> list[Wave]:
    return design(
        seed=seed,
        block_size=block_size,
        serial_prompts=(100, 400, 1200),
        serial_outputs=(8, 48, 96),
        concurrency=(3, 6),
        conc_prompts=(200, 700, 1300),
        conc_outputs=(24, 80),
        rounds=4,
        hit_every=3,
    )


async def send_one(session: aiohttp.ClientSession, base_url: str, model: str, req: CalRequest) -> Sample:
    """Stream one completion; the first chunk carrying a token marks the first-token time."""
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "min_tokens": req.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    t_send = time.perf_counter()
    t_first = 0.0
    first_tokens = 1
    chunks = 0
    usage: dict[str, Any] = {}
    async with session.post(base_url.rstrip("/") + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base_url}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for data in data_payloads(resp.content.iter_any()):
            if data == DONE:
                break
            chunk = json.loads(data)
            for ch in chunk.get("choices") or ():
                if ch.get("text") or ch.get("token_ids"):
                    chunks += 1
                    if not t_first:
                        t_first = time.perf_counter()
                        first_tokens = len(ch.get("token_ids") or ()) or 1
                    break
            if chunk.get("usage"):
                usage = chunk["usage"]
    t_end = time.perf_counter()
    if not t_first:
        raise RuntimeError(f"{base_url}: request {req.key} streamed no token")
    return Sample(
        req,
        t_send,
        t_first,
        t_end,
        int(usage.get("prompt_tokens", len(req.prompt))),
        int(usage.get("completion_tokens", req.max_tokens)),
        first_tokens,
        chunks,
    )


async def run_wave(session: aiohttp.ClientSession, base_url: str, model: str, wave: Wave) -> list[Sample]:
    async def lane(reqs: list[CalRequest]) -> list[Sample]:
        return [await send_one(session, base_url, model, r) for r in reqs]

    results = await asyncio.gather(*(lane(lr) for lr in wave.lanes))
    return [s for lane_samples in results for s in lane_samples]


async def run_design(base_url: str, model: str, waves: Sequence[Wave]) -> list[list[Sample]]:
    """Run each wave in turn (one warm-up request first); returns the samples per wave."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        warm = _Rng(99).tokens(64)
        for _ in range(2):
            await send_one(session, base_url, model, CalRequest("warmup", "warmup", warm + _Rng(98).tokens(8), 4, 0))
        out: list[list[Sample]] = []
        for w in waves:
            t0 = time.perf_counter()
            out.append(await run_wave(session, base_url, model, w))
            logger.info("%s: wave %s, %d requests in %.1f s", base_url, w.name, len(out[-1]), time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------------------------

COEFS: Final[tuple[str, ...]] = ("a0", "b0", "b1", "b2")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def features(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    """Regressor rows for (a0, b0, b1, b2) and their targets (ms) for one wave's samples.

    Each request gives an e2e row (TTFT terms + decode terms; its end time is exact even when the server
    coalesced tokens into one chunk) and, when its first chunk held exactly one token, a TTFT row. The terms
    come from the client-side timeline of the whole wave, see the module docstring."""
    rows: list[list[float]] = []
    ys: list[float] = []
    for s in samples:
        miss = max(1, s.prompt_tokens - s.req.cached_tokens)
        # --- TTFT: requests prefilled with or before this one, after it was sent
        admitted, prefill = 1.0, float(miss)
        busy = False
        decoding_at_prefill = 0.0
        for o in samples:
            if o is s:
                continue
            if o.t_send < s.t_send < o.t_end:
                busy = True
            if s.t_send <= o.t_first <= s.t_first and o.t_send <= s.t_first:
                admitted += 1
                prefill += max(1, o.prompt_tokens - o.req.cached_tokens)
            if o.t_first < s.t_first < o.t_end:
                decoding_at_prefill += 1
        steps = 1.0 + (0.5 if busy else 0.0)
        ttft_row = [admitted, steps, prefill, decoding_at_prefill * steps]
        if s.clean_first:
            rows.append(ttft_row)
            ys.append(s.ttft * 1000.0)
        # --- decode: out - 1 steps, batch = decoding sequences, plus prefills landing meanwhile
        n = s.completion_tokens - 1
        dec_row = [0.0, 0.0, 0.0, 0.0]
        if n > 0 and s.decode > 0:
            dur = s.decode
            conc = 1.0
            others_prefill, others_admitted = 0.0, 0.0
            for o in samples:
                if o is s:
                    continue
                conc += _overlap(s.t_first, s.t_end, o.t_first, o.t_end) / dur
                if s.t_first < o.t_first < s.t_end:
                    others_admitted += 1
                    others_prefill += max(1, o.prompt_tokens - o.req.cached_tokens)
            dec_row = [others_admitted, float(n), others_prefill, conc * n]
        rows.append([a + b for a, b in zip(ttft_row, dec_row, strict=True)])
        ys.append(s.e2e * 1000.0)
    return rows, ys


def _nnls_rel(x: Any, y: Any) -> Any:
    """Relative least squares with non-negative coefficients (drop the most negative, refit)."""
    import numpy as np

    w = 1.0 / y
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        del active[int(np.argmin(sol))]
    return coef


def fit(rows: Sequence[Sequence[float]], ys: Sequence[float], *, trim: float = 3.0, rounds: int = 3) -> dict[str, float]:
    """Robust relative least squares for (a0, b0, b1, b2) in ms, non-negative.

    Rows whose relative residual exceeds ``trim`` × the median absolute relative residual are dropped and the
    fit repeated (``rounds`` times at most): on a shared CPU a few requests are delayed by other processes."""
    import numpy as np

    x = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    keep = y > 0
    x, y = x[keep], y[keep]
    coef = _nnls_rel(x, y)
    for _ in range(rounds):
        r = np.abs(x @ coef - y) / y
        mad = float(np.median(r))
        inl = r <= max(trim * mad, 0.05)
        if inl.all() or inl.sum() < x.shape[1] * 4:
            break
        x, y = x[inl], y[inl]
        coef = _nnls_rel(x, y)
    return {name: float(v) for name, v in zip(COEFS, coef, strict=True)}


# ---------------------------------------------------------------------------------------------------------------
# Server facts
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerFacts:
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    model: str


async def server_facts(base_url: str, model: str | None) -> ServerFacts:
    """``block_size``/``num_gpu_blocks`` from ``vllm:cache_config_info``, model and ``max_model_len`` from
    ``/v1/models``."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(base_url.rstrip("/") + "/metrics") as resp:
            resp.raise_for_status()
            text = await resp.text()
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            models = (await resp.json()).get("data") or []
    labels: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:cache_config_info":
            for sample in fam.samples:
                labels = dict(sample.labels)
                break
    if not labels:
        raise RuntimeError(f"{base_url}/metrics has no vllm:cache_config_info")
    card = next((m for m in models if model is None or m.get("id") == model), None)
    if card is None:
        raise RuntimeError(f"{base_url}/v1/models does not serve {model!r}")
    return ServerFacts(
        block_size=int(labels["block_size"]),
        num_gpu_blocks=int(labels["num_gpu_blocks"]),
        max_model_len=int(card.get("max_model_len") or 2048),
        model=str(card["id"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# Held-out comparison
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ErrorStats:
    n: int
    median: float
    p90: float


def _pct(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rel_errors(real: Sequence[float], sim: Sequence[float]) -> ErrorStats:
    errs = [abs(s - r) / r for r, s in zip(real, sim, strict=True) if r > 0]
    return ErrorStats(len(errs), _pct(errs, 0.5), _pct(errs, 0.9))


@dataclass(slots=True)
class Comparison:
    target: str
    per_request: dict[str, ErrorStats] = field(default_factory=dict)  # metric -> stats
    per_cell: dict[str, ErrorStats] = field(default_factory=dict)
    cells: list[tuple[str, int, float, float, float, float]] = field(default_factory=list)
    # (cell, n, real ttft ms, sim ttft ms, real e2e ms, sim e2e ms)


def compare(target: str, real: Sequence[Sample], sim: Sequence[Sample]) -> Comparison:
    by_key = {s.req.key: s for s in sim}
    pairs = [(r, by_key[r.req.key]) for r in real if r.req.key in by_key]
    cmp = Comparison(target)
    # TTFT only where both first-token times are trustworthy (see Sample.clean_first); e2e everywhere.
    clean = [(r, s) for r, s in pairs if r.clean_first and s.clean_first]
    cmp.per_request["ttft"] = rel_errors([r.ttft for r, _ in clean], [s.ttft for _, s in clean])
    cmp.per_request["e2e"] = rel_errors([r.e2e for r, _ in pairs], [s.e2e for _, s in pairs])
    cells: dict[str, list[tuple[Sample, Sample]]] = {}
    for r, s in pairs:
        cells.setdefault(r.req.cell, []).append((r, s))
    for cell, ps in sorted(cells.items()):
        cps = [(r, s) for r, s in ps if r.clean_first and s.clean_first]
        cmp.cells.append(
            (
                cell,
                len(ps),
                1000 * statistics.fmean(r.ttft for r, _ in cps) if cps else math.nan,
                1000 * statistics.fmean(s.ttft for _, s in cps) if cps else math.nan,
                1000 * statistics.fmean(r.e2e for r, _ in ps),
                1000 * statistics.fmean(s.e2e for _, s in ps),
            )
        )
    tc = [c for c in cmp.cells if not math.isnan(c[2])]
    cmp.per_cell["ttft"] = rel_errors([c[2] for c in tc], [c[3] for c in tc])
    cmp.per_cell["e2e"] = rel_errors([c[4] for c in cmp.cells], [c[5] for c in cmp.cells])
    return cmp


@contextlib.asynccontextmanager
async def simulated_pod(profile: Profile, model: str, workdir: Path) -> AsyncIterator[str]:
    """One simulated vLLM pod running ``profile`` in its own process (``extproc sim --pods 1``), like the real
    server is; yields its base URL and stops the process on exit."""
    path = workdir / f"{profile.name}.yaml"
    profile.to_yaml(path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "sim", "--pods", "1", "--profile", str(path), "--model", model,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"simulated pod exited with {await proc.wait()} before listening")
        endpoint = json.loads(line)["endpoints"][0]
        yield f"http://{endpoint}"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CalibrationResult:
    profile: Profile
    coefficients: dict[str, float]
    facts: ServerFacts
    train_requests: int
    train_fit_error: ErrorStats
    comparisons: list[Comparison]
    seconds: float
    real_prefix_hits: dict[str, float]
    expected_prefix_hits: int
    seed: int
    loadavg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end (shared machines)
    sim_overhead: dict[str, float] = field(default_factory=dict)  # sim-observed minus fitted, per coefficient


async def _prefix_hits(base_url: str) -> float:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(base_url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:prefix_cache_hits":
            total += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return total


async def calibrate(
    targets: Sequence[str],
    *,
    model: str | None,
    name: str,
    accelerator: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    validate: bool = True,
    seed: int | None = None,
    sim_correct: bool = True,
) -> CalibrationResult:
    from extproc.sim.profiles import Profile

    import numpy as np

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    # A fresh seed per run: the real server keeps its prefix cache between runs, and prompts from an earlier
    # run would turn designed misses into hits.
    seed = seed if seed is not None else int.from_bytes(os.urandom(6), "big")
    facts = await server_facts(targets[0], model)
    train = training_design(facts.block_size, seed=seed)
    expected_hits = sum(r.cached_tokens for w in train for lane in w.lanes for r in lane)
    rows: list[list[float]] = []
    ys: list[float] = []
    n_train = 0
    hits: dict[str, float] = {}
    for url in targets:
        h0 = await _prefix_hits(url)
        for wave_samples in await run_design(url, facts.model, train):
            r, y = features(wave_samples)
            rows += r
            ys += y
            n_train += len(wave_samples)
        hits[url] = await _prefix_hits(url) - h0
    coef = fit(rows, ys)
    pred = np.asarray(rows) @ np.asarray([coef[c] for c in COEFS])
    fit_err = rel_errors(ys, pred.tolist())
    profile = Profile(
        name=name,
        model=facts.model,
        accelerator=accelerator,
        b0_ms=round(coef["b0"], 5),
        b1_ms=round(coef["b1"], 7),
        b2_ms=round(coef["b2"], 5),
        a0_ms=round(coef["a0"], 5),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_gpu_blocks=facts.num_gpu_blocks,
        block_size=facts.block_size,
        max_loras=1,
        max_model_len=facts.max_model_len,
        sources=(
            f"fitted by `extproc sim calibrate` against {len(targets)} real vLLM server(s): {n_train} training "
            f"requests (prompt x output x concurrency x cache hit/miss), relative least squares on per-request "
            f"TTFT and decode-time decompositions; block_size/num_gpu_blocks from vllm:cache_config_info"
        ),
    )
    # Sim-overhead correction (one fixed-point step): run the same training design against a simulated pod
    # with the fitted profile, fit the same regression to what the client saw, and subtract the difference
    # (the simulator's own HTTP/event-loop overhead per request and per step) from the real coefficients.
    if sim_correct:
        sim_rows: list[list[float]] = []
        sim_ys: list[float] = []
        with tempfile.TemporaryDirectory(prefix="calibrate-sim-") as wd:
            async with simulated_pod(profile, facts.model, Path(wd)) as sim_url:
                for wave_samples in await run_design(sim_url, facts.model, training_design(facts.block_size, seed=seed)):
                    r, y = features(wave_samples)
                    sim_rows += r
                    sim_ys += y
        seen = fit(sim_rows, sim_ys)
        corrected = {c: max(0.0, coef[c] - (seen[c] - coef[c])) for c in COEFS}
        logger.info("sim overhead correction: fitted %s, sim shows %s, corrected %s", coef, seen, corrected)
        sim_overhead = {c: seen[c] - coef[c] for c in COEFS}
        coef = corrected
        profile = profile.replace(
            b0_ms=round(coef["b0"], 5), b1_ms=round(coef["b1"], 7), b2_ms=round(coef["b2"], 5), a0_ms=round(coef["a0"], 5),
            sources=profile.sources + "; corrected once for the simulator's own serving overhead (sim fit minus real fit)",
        )  # fmt: skip
    else:
        sim_overhead = {}
    comparisons: list[Comparison] = []
    if validate:
        # Each held-out wave runs on the real server and then on a fresh simulated pod, back to back, so both
        # see the same background load of the machine.
        held = heldout_design(facts.block_size, seed=seed + 1)
        with tempfile.TemporaryDirectory(prefix="calibrate-sim-") as wd:
            for url in targets:
                real_samples: list[Sample] = []
                sim_samples: list[Sample] = []
                for wave in held:
                    real_samples += (await run_design(url, facts.model, [wave]))[0]
                    async with simulated_pod(profile, facts.model, Path(wd)) as sim_url:
                        sim_samples += (await run_design(sim_url, facts.model, [wave]))[0]
                comparisons.append(compare(url, real_samples, sim_samples))
    return CalibrationResult(
        profile,
        coef,
        facts,
        n_train,
        fit_err,
        comparisons,
        time.perf_counter() - t0,
        hits,
        expected_hits,
        seed,
        (load0, os.getloadavg()[0]),
        sim_overhead,
    )


def render_report(res: CalibrationResult, command: str) -> str:
    p = res.profile
    lines = [
        f"# Calibration report: `{p.name}`",
        "",
        f"Command: `{command}`",
        "",
        f"Wall time: {res.seconds:.0f} s. Training requests: {res.train_requests}. "
        f"Server: block_size {res.facts.block_size}, num_gpu_blocks {res.facts.num_gpu_blocks}, "
        f"max_model_len {res.facts.max_model_len}. Machine load average (1 min) at start / end: "
        f"{res.loadavg[0]:.1f} / {res.loadavg[1]:.1f} on {os.cpu_count()} CPUs.",
        "",
        "| coefficient | fitted (ms) |",
        "|---|---|",
        f"| a0 (per admitted request) | {p.a0_ms:.4f} |",
        f"| b0 (per step) | {p.b0_ms:.4f} |",
        f"| b1 (per uncached prefill token) | {p.b1_ms:.6f} |",
        f"| b2 (per decoding sequence) | {p.b2_ms:.4f} |",
        "",
        *(
            [
                "Simulator overhead subtracted (coefficients the simulated pod showed minus those it was given, ms): "
                + ", ".join(f"{c} {res.sim_overhead[c]:+.4f}" for c in COEFS)
                + ".",
                "",
            ]
            if res.sim_overhead
            else []
        ),
        f"Training fit (relative error of the linear model on its own rows, n={res.train_fit_error.n}): "
        f"median {100 * res.train_fit_error.median:.1f} %, p90 {100 * res.train_fit_error.p90:.1f} %.",
        "",
    ]
    for url, h in res.real_prefix_hits.items():
        lines.append(
            f"Prefix-cache hit tokens during training: {h:.0f} reported by {url}'s `vllm:prefix_cache_hits_total`, "
            f"{res.expected_prefix_hits} designed (design seed {res.seed})."
        )
    for c in res.comparisons:
        lines += [
            "",
            f"## Held-out: real `{c.target}` vs simulated pod (fitted profile)",
            "",
            "| error | n | median | p90 |",
            "|---|---|---|---|",
        ]
        for scope, d in (("per request", c.per_request), ("per cell (means)", c.per_cell)):
            for metric in ("ttft", "e2e"):
                e = d[metric]
                lines.append(f"| {metric.upper()} {scope} | {e.n} | {100 * e.median:.1f} % | {100 * e.p90:.1f} % |")
        lines += [
            "",
            "| cell | n | real TTFT ms | sim TTFT ms | real e2e ms | sim e2e ms |",
            "|---|---|---|---|---|---|",
        ]
        for cell, n, rt, st, re_, se in c.cells:
            lines.append(f"| {cell} | {n} | {rt:.1f} | {st:.1f} | {re_:.1f} | {se:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CLI (``extproc sim calibrate``)
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", default=[], help="base URL of a real vLLM server (repeatable)")
    parser.add_argument(
        "--launch",
        action="store_true",
        help="start one real vLLM CPU server on the tiny model (needs scripts/real_vllm_setup.sh) and calibrate it",
    )
    parser.add_argument("--out", required=True, help="where to write the fitted profile YAML")
    parser.add_argument(
        "--model", dest="cal_model", default=None, help="served model name (default: the server's first model)"
    )
    parser.add_argument("--name", default=None, help="profile name (default: the --out file stem)")
    parser.add_argument("--accelerator", default="cpu-1-core", help="accelerator label written in the profile")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the server's --max-num-seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's --max-num-batched-tokens")
    parser.add_argument("--report", default=None, help="write a Markdown report here")
    parser.add_argument("--seed", dest="cal_seed", type=int, default=None, help="design seed (default: random per run)")
    parser.add_argument(
        "--no-sim-correct", action="store_true", help="do not subtract the simulated pod's own serving overhead"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the held-out real-vs-simulated comparison")


async def _run(args: argparse.Namespace) -> int:
    if not args.target and not args.launch:
        print("calibrate: give --target URL (repeatable) or --launch", file=sys.stderr)
        return 2
    command = "extproc sim calibrate " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["sim", "calibrate"] else sys.argv[1:])
    async with contextlib.AsyncExitStack() as stack:
        targets = list(args.target)
        if args.launch:
            from extproc.sim.tiny_model import build_tiny_model

            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="calibrate-")))
            model_dir = build_tiny_model(wd / "tiny")
            spec = VllmLaunchSpec(
                model_dir, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
            )
            servers = await stack.enter_async_context(real_vllm_servers([spec], workdir=wd / "run"))
            print(f"launched real vLLM at {servers[0].url} in {servers[0].startup_s:.1f} s", file=sys.stderr)
            targets.append(servers[0].url)
        res = await calibrate(
            targets,
            model=args.cal_model,
            name=args.name or Path(args.out).stem,
            accelerator=args.accelerator,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            validate=not args.no_validate,
            seed=args.cal_seed,
            sim_correct=not args.no_sim_correct,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res.profile.to_yaml(args.out)
    report = render_report(res, command)
    if args.report:
        Path(args.report).write_text(report, encoding="utf-8")
    print(report)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc sim calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
