"""Run the real Envoy binary as a child process (tests, benchmarks, the demo).

``EnvoyProcess.start(bootstrap)`` writes the bootstrap to a work directory, launches Envoy with
a dynamic base id and ``--admin-address-path``, waits for admin ``/ready`` to answer ``LIVE``,
and reads the actual listener ports from admin ``/listeners?format=json`` (so configs may use
port 0). Envoy's stdout/stderr go to ``log_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from extproc.envoy_config import find_envoy_binary

log = logging.getLogger(__name__)

__all__ = ["EnvoyProcess", "EnvoyStartError"]


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready; the message carries the tail of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class EnvoyProcess:
    """A running Envoy. Build it with :meth:`start`; always :meth:`stop` it (or use ``async with``)."""

    __slots__ = (
        "_proc",
        "_workdir",
        "_owns_workdir",
        "_log_file",
        "config_path",
        "log_path",
        "admin_url",
        "listener_ports",
        "_stopped",
    )

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        workdir: Path,
        owns_workdir: bool,
        log_file: Any,
        config_path: Path,
        log_path: Path,
    ) -> None:
        self._proc = proc
        self._workdir = workdir
        self._owns_workdir = owns_workdir
        self._log_file = log_file
        self.config_path = config_path
        self.log_path = log_path
        self.admin_url = ""
        self.listener_ports: dict[str, int] = {}
        self._stopped = False

    # ------------------------------------------------------------------ properties

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def listener_port(self) -> int:
        """Port of the first listener."""
        if not self.listener_ports:
            raise RuntimeError("Envoy has no listener")
        return next(iter(self.listener_ports.values()))

    @property
    def listener_url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(
        cls,
        bootstrap: dict[str, Any] | str,
        *,
        concurrency: int = 1,
        log_level: str = "warning",
        binary: str | None = None,
        workdir: str | Path | None = None,
        ready_timeout_s: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> EnvoyProcess:
        """Launch Envoy with ``bootstrap`` (a dict, or YAML/JSON text) and wait until it is LIVE."""
        envoy = binary or find_envoy_binary()
        owns = workdir is None
        wd = Path(tempfile.mkdtemp(prefix="extproc-envoy-")) if workdir is None else Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        config_path = wd / ("bootstrap.json" if isinstance(bootstrap, dict) else "bootstrap.yaml")
        config_path.write_text(json.dumps(bootstrap, indent=1) if isinstance(bootstrap, dict) else bootstrap)
        admin_path = wd / "admin-address.txt"
        with contextlib.suppress(FileNotFoundError):
            admin_path.unlink()
        log_path = wd / "envoy.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [
            envoy,
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "--concurrency",
            str(concurrency),
            "--log-level",
            log_level,
            "--admin-address-path",
            str(admin_path),
            *extra_args,
        ]
        log.debug("starting envoy: %s", " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        self = cls(proc, workdir=wd, owns_workdir=owns, log_file=log_file, config_path=config_path, log_path=log_path)
        try:
            await self._wait_ready(admin_path, ready_timeout_s)
        except BaseException:
            await self.stop(keep_files=True)
            raise
        log.info("envoy pid %d live: listeners %s, admin %s", self.pid, self.listener_ports, self.admin_url)
        return self

    async def _wait_ready(self, admin_path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if self._proc.returncode is not None:
                    raise EnvoyStartError(
                        f"envoy exited with {self._proc.returncode} during startup (log {self.log_path}):\n"
                        + _tail(self.log_path)
                    )
                if time.monotonic() > deadline:
                    raise EnvoyStartError(
                        f"envoy not LIVE after {timeout_s:.0f}s (log {self.log_path}):\n" + _tail(self.log_path)
                    )
                if not self.admin_url:
                    text = admin_path.read_text().strip() if admin_path.exists() else ""
                    if text:
                        self.admin_url = f"http://{text}"
                if self.admin_url:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with session.get(f"{self.admin_url}/ready") as resp:
                            body = (await resp.text()).strip()
                        if resp.status == 200 and body == "LIVE":
                            self.listener_ports = await self._listener_ports(session)
                            return
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)

    async def _listener_ports(self, session: aiohttp.ClientSession) -> dict[str, int]:
        async with session.get(f"{self.admin_url}/listeners?format=json") as resp:
            data = json.loads(await resp.text())
        ports: dict[str, int] = {}
        for status in data.get("listener_statuses", []):
            sock = status.get("local_address", {}).get("socket_address", {})
            if "port_value" in sock:
                ports[status.get("name", "")] = int(sock["port_value"])
        return ports

    async def admin_get(self, path: str) -> str:
        """GET an admin endpoint (``/stats``, ``/clusters``...) and return the body."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session:
            async with session.get(f"{self.admin_url}{path}") as resp:
                return await resp.text()

    async def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges as a dict (``/stats?format=json``, optionally filtered by prefix)."""
        query = "/stats?format=json"
        if prefix:
            query += f"&filter=^{prefix}"
        data = json.loads(await self.admin_get(query))
        out: dict[str, int] = {}
        for item in data.get("stats", []):
            if "name" in item and isinstance(item.get("value"), int):
                out[item["name"]] = item["value"]
        return out

    async def stop(self, *, timeout_s: float = 5.0, keep_files: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; always reaps. Returns the exit status."""
        if self._stopped:
            return self._proc.returncode
        self._stopped = True
        try:
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self._proc.wait(), timeout_s)
                except asyncio.TimeoutError:
                    log.warning("envoy pid %d ignored SIGTERM; killing", self._proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                    await self._proc.wait()
        finally:
            self._log_file.close()
            if self._owns_workdir and not keep_files:
                shutil.rmtree(self._workdir, ignore_errors=True)
            elif keep_files:
                log.info("envoy files kept in %s", self._workdir)
        return self._proc.returncode

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(keep_files=exc is not None)

    def __repr__(self) -> str:
        return f"EnvoyProcess(pid={self.pid}, listeners={self.listener_ports}, admin={self.admin_url!r})"
