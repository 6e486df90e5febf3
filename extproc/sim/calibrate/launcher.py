"""The real-vLLM launcher: starts ``vllm.entrypoints.openai.api_server`` from the venv made by
``scripts/real_vllm_setup.sh`` on free ports, with KV events on, waits for ``/health`` and kills the whole process
group on exit. Used by ``extproc sim calibrate --launch``, ``tests/real_vllm`` and ``scripts/real_vllm_serve.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from extproc.netutil import free_ports

logger = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
VENV_ENV: Final = "REAL_VLLM_VENV"
SETUP_STAMP: Final = ".real_vllm_setup.stamp"
SETUP_SCRIPT: Final = REPO_ROOT / "scripts" / "real_vllm_setup.sh"


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
