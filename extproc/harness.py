"""Start and stop a whole routing stack on free ports: real Envoy in front, ``extproc serve`` beside it.

The demo, the benchmarks and the integration tests use this one harness, so they exercise exactly what a user
runs. The scheduler runs as a subprocess by default (its own core, its own event loop, like production);
``in_process=True`` runs it on the caller's loop so tests can inspect its state.

```python
async with Stack(StackSpec(endpoints=fleet.endpoints, config="default")) as st:
    st.url          # Envoy listener, e.g. "http://127.0.0.1:40123"
    st.metrics_url  # scheduler Prometheus endpoint (None for Envoy-only setups)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_RESPONSE_OBSERVE, DEFAULT_SCRAPE_INTERVAL_S, ResponseObserve
from extproc.envoy_config import render_bootstrap
from extproc.envoy_runner import EnvoyProcess

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StackSpec:
    endpoints: list[str]
    config: str | None = "default"  # None → Envoy only (lb_policy)
    lb_policy: str | None = None  # "ROUND_ROBIN" | "LEAST_REQUEST" for Envoy-only setups
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    kv_events: dict[str, Any] | None = None
    models: list[str] = field(default_factory=list)
    failure_mode: str = "fail-close"
    fallback_endpoints: list[str] | None = None  # fail-open fallback cluster (default: the endpoints)
    response_observe: ResponseObserve = DEFAULT_RESPONSE_OBSERVE
    scheduler_args: list[str] = field(default_factory=list)
    envoy_concurrency: int = 1
    envoy_args: dict[str, Any] = field(default_factory=dict)  # extra render_bootstrap keyword arguments
    in_process: bool = False
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    start_scheduler: bool = True  # False: render Envoy for a scheduler that is not running (failure-mode tests)
    grpc_port: int = 0  # fixed ext_proc port (needed when start_scheduler=False or for restarts)
    # active-active: this many ``extproc serve`` replicas behind Envoy's ext_proc cluster, sharing state through
    # Redis at ``shared_state`` (None with replicas > 1: the stack starts its own redis-server)
    replicas: int = 1
    shared_state: str | None = None


class SchedulerProcess:
    """``python -m extproc serve`` as a subprocess, ports discovered through --ready-file."""

    def __init__(self, proc: asyncio.subprocess.Process, info: dict[str, Any], workdir: Path, log_path: Path) -> None:
        self.proc = proc
        self.info = info
        self.workdir = workdir
        self.log_path = log_path

    @property
    def grpc_port(self) -> int:
        return int(self.info["grpc_port"])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}"

    @classmethod
    async def start(cls, args: list[str], *, timeout_s: float = 60.0, env: dict[str, str] | None = None) -> "SchedulerProcess":
        wd = Path(tempfile.mkdtemp(prefix="extproc-sched-"))
        ready = wd / "ready.json"
        log_path = wd / "scheduler.log"
        logf = open(log_path, "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "extproc", "serve", "--host", "127.0.0.1", "--ready-file", str(ready), *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, env={**os.environ, **(env or {})}
        )
        logf.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready.exists():
            if proc.returncode is not None:
                raise RuntimeError(f"extproc serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if loop.time() > deadline:
                proc.kill()
                await proc.wait()
                raise TimeoutError(f"extproc serve not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        return cls(proc, info, wd, log_path)

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        return self.proc.returncode

    async def kill(self) -> None:
        """Hard kill (SIGKILL), for failure-mode tests."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


class Stack:
    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.envoy: EnvoyProcess | None = None
        self.scheduler: SchedulerProcess | None = None
        self.server: Any = None  # in-process SchedulerServer
        self.url = ""
        self.metrics_url: str | None = None
        self.grpc_port = spec.grpc_port
        self.schedulers: list[SchedulerProcess | None] = []  # every replica (subprocess mode); [0] is .scheduler
        self.grpc_ports: list[int] = []
        self.redis: RedisProcess | None = None
        self.shared_state: str | None = spec.shared_state

    def scheduler_argv(self, replica: int = 0) -> list[str]:
        s = self.spec
        argv = [
            "--endpoints", ",".join(s.endpoints),
            "--config", s.config or "default",
            "--grpc-port", str(self.grpc_ports[replica] if replica < len(self.grpc_ports) else (self.grpc_port if replica == 0 else 0)),
            "--health-port", "0",
            "--metrics-port", "0",
            "--scrape-interval", str(s.scrape_interval_s),
            "--response-observe", s.response_observe,
            "--max-body-bytes", str(s.max_body_bytes),
            "--log-level", os.environ.get("EXTPROC_LOG_LEVEL", "warning"),
            # a config that binds one KV-event endpoint for every pod (llm-d's zmqEndpoint: tcp://*:5557) binds a
            # free port here instead: the lab never takes a fixed port (the ready file reports the bound one)
            "--kv-events-bind", "tcp://127.0.0.1:*",
        ]  # fmt: skip
        for m in s.models:
            argv += ["--model", m]
        if self.shared_state:
            argv += ["--shared-state", self.shared_state, "--replica-id", f"r{replica}"]
        if s.labels or s.kv_events:
            wd = Path(tempfile.mkdtemp(prefix="extproc-stack-"))
            f = wd / "endpoints.json"
            f.write_text(json.dumps({"endpoints": [], "labels": s.labels, "kv_events": s.kv_events or {}}))
            argv += ["--endpoints-file", str(f)]
        return argv + list(s.scheduler_args)

    async def start_scheduler(self) -> None:
        s = self.spec
        if s.in_process:
            from extproc.server.app import SchedulerServer
            from extproc.server.cli import add_arguments, options_from_args
            import argparse

            p = argparse.ArgumentParser()
            add_arguments(p)
            opts = options_from_args(p.parse_args(self.scheduler_argv()))
            opts.host = "127.0.0.1"
            self.server = SchedulerServer(opts)
            await self.server.start()
            self.grpc_port = self.server.grpc_port
            self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}"
        elif s.replicas > 1:
            if not self.grpc_ports:
                from extproc.netutil import free_ports

                self.grpc_ports = [self.grpc_port, *free_ports(s.replicas - 1)] if self.grpc_port else list(free_ports(s.replicas))
            if self.shared_state is None:
                self.redis = await RedisProcess.start()
                self.shared_state = self.redis.url
            self.schedulers = list(await asyncio.gather(*(SchedulerProcess.start(self.scheduler_argv(i)) for i in range(s.replicas))))
            self.scheduler = self.schedulers[0]
            self.grpc_port = self.grpc_ports[0]
            self.metrics_url = self.scheduler.metrics_url if self.scheduler is not None else None
        else:
            self.scheduler = await SchedulerProcess.start(self.scheduler_argv())
            self.grpc_port = self.scheduler.grpc_port
            self.metrics_url = self.scheduler.metrics_url

    @property
    def metrics_urls(self) -> list[str]:
        """Every running replica's Prometheus / debug URL."""
        if self.schedulers:
            return [p.metrics_url for p in self.schedulers if p is not None]
        return [self.metrics_url] if self.metrics_url else []

    async def kill_replica(self, i: int) -> None:
        """SIGKILL replica ``i`` (active-active tests and ``demo --kill-replica``)."""
        p = self.schedulers[i]
        if p is not None:
            await p.kill()
            self.schedulers[i] = None

    async def restart_replica(self, i: int) -> None:
        """Start replica ``i`` again on its ext_proc port."""
        self.schedulers[i] = await SchedulerProcess.start(self.scheduler_argv(i))

    async def stop_scheduler(self, hard: bool = False) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        procs = [p for p in self.schedulers if p is not None] or ([self.scheduler] if self.scheduler is not None else [])
        if hard:
            await asyncio.gather(*(p.kill() for p in procs))
        else:
            await asyncio.gather(*(p.stop() for p in procs))
        self.scheduler = None
        self.schedulers = []
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None
            self.shared_state = self.spec.shared_state

    async def __aenter__(self) -> "Stack":
        s = self.spec
        try:
            if s.config is None:
                bootstrap = render_bootstrap(listen="127.0.0.1:0", endpoints=s.endpoints, lb_policy=s.lb_policy or "ROUND_ROBIN", **s.envoy_args)
            else:
                if s.start_scheduler:
                    await self.start_scheduler()
                elif not self.grpc_port:
                    from extproc.netutil import free_port

                    self.grpc_port = free_port()
                fallback = s.fallback_endpoints if s.fallback_endpoints is not None else (s.endpoints if s.failure_mode == "fail-open" else [])
                ports = self.grpc_ports or [self.grpc_port]
                bootstrap = render_bootstrap(
                    listen="127.0.0.1:0",
                    extproc=",".join(f"127.0.0.1:{p}" for p in ports),
                    failure_mode=s.failure_mode,
                    fallback_endpoints=fallback,
                    response_observe=s.response_observe,
                    max_body_bytes=s.max_body_bytes,
                    **s.envoy_args,
                )
            self.envoy = await EnvoyProcess.start(bootstrap, concurrency=s.envoy_concurrency)
            self.url = self.envoy.listener_url
            return self
        except BaseException:
            await self.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None
        await self.stop_scheduler()


class RedisProcess:
    """A throw-away ``redis-server`` (Debian's package) on a free port, no persistence: the shared store of
    active-active replicas in the demo, the benchmarks and the tests."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, workdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        import shutil

        path = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if path is None:
            raise FileNotFoundError("redis-server not found: install Debian's redis-server (scripts/system_deps.sh)")
        return path

    @classmethod
    async def start(cls, port: int = 0, timeout_s: float = 20.0) -> "RedisProcess":
        from extproc.netutil import free_port

        port = port or free_port()
        wd = Path(tempfile.mkdtemp(prefix="extproc-redis-"))
        argv = [cls.binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(wd), "--logfile", str(wd / "redis.log")]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"PING\r\n")
                line = await asyncio.wait_for(_r.readline(), 2.0)
                w.close()
                if line.startswith(b"+PONG"):
                    return cls(proc, port, wd)
            except (OSError, asyncio.TimeoutError):
                pass
            if loop.time() > deadline:
                await stop_process(proc)
                raise TimeoutError("redis-server did not answer PING")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL (the shared store dies)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        await stop_process(self.proc)


async def start_sim_process(args: list[str], timeout_s: float = 60.0) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Run ``extproc sim ARGS`` in a subprocess (its own core) and return (process, its ready JSON line)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "sim", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except asyncio.TimeoutError:
        await stop_process(proc)
        raise
    if not line:
        err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
        await stop_process(proc)
        raise RuntimeError(f"extproc sim exited before it was ready:\n{err[-3000:]}")
    # keep draining stderr so the pipe never fills and blocks the fleet
    if proc.stderr is not None:
        asyncio.get_running_loop().create_task(_drain(proc.stderr))
    return proc, json.loads(line)


async def _drain(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.read(65536):
            pass


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = 10.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


class BatchServerProcess:
    """``python -m extproc batch serve`` as a subprocess (the demo, the batch tests and benchmark)."""

    def __init__(self, proc: asyncio.subprocess.Process, info: dict[str, Any], log_path: Path) -> None:
        self.proc = proc
        self.info = info
        self.log_path = log_path

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, gateway: str, store: str, *, port: int = 0, args: list[str] | None = None, timeout_s: float = 60.0) -> "BatchServerProcess":
        wd = Path(tempfile.mkdtemp(prefix="extproc-batch-"))
        ready = wd / "ready.json"
        log_path = wd / "batch.log"
        logf = open(log_path, "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "extproc", "batch", "serve", "--host", "127.0.0.1", "--port", str(port), "--gateway", gateway,
                "--store", store, "--ready-file", str(ready), "--log-level", os.environ.get("EXTPROC_LOG_LEVEL", "warning"), *(args or [])]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready.exists():
            if proc.returncode is not None:
                raise RuntimeError(f"extproc batch serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if loop.time() > deadline:
                await stop_process(proc)
                raise TimeoutError(f"extproc batch serve not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        return cls(proc, json.loads(ready.read_text()), log_path)

    async def stop(self) -> None:
        await stop_process(self.proc)

    async def kill(self) -> None:
        """SIGKILL, no cleanup: the crash the store must survive."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def start_sidecar_process(upstreams: list[str], timeout_s: float = 30.0) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """``extproc pd-sidecar`` in its own process in front of each decode pod; returns (process, {sidecar: pod})."""
    argv = [sys.executable, "-m", "extproc", "pd-sidecar"]
    for u in upstreams:
        argv += ["--listen", "127.0.0.1:0", "--upstream", u]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        info = json.loads(line)
    except (asyncio.TimeoutError, ValueError):
        await stop_process(proc)
        raise RuntimeError("extproc pd-sidecar did not start") from None
    return proc, {c["listen"]: c["upstream"] for c in info["sidecars"]}
