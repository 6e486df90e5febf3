"""Peer routers a user might pick instead of extproc, run from their PyPI wheels (extra ``bench``).

- ``vllm-router`` (Rust; ``vllm-router --host --port --worker-urls ... --policy ...``)
- ``sglang-router`` (Rust; ``sglang-router launch --host --port --worker-urls ... --policy ...``)

Both are their own HTTP proxies (no Envoy). Both wait for ``/health`` on every worker at start; the simulator
serves that and the other endpoints they probe (``/get_load``, ``/tokenize``, ``/get_model_info``, ...), so they
run at their best. Setup names are contracts: ``vllm-router-rr|p2c|cache`` and ``sglang-router-rr|p2c|cache``.

``vllm-router-pd`` is vllm-router's own P/D mode (``--vllm-pd-disaggregation --prefill URL --decode URL
--prefill-policy cache_aware --decode-policy power_of_two``, as the reference's CLI docs show): it sends the
prefill leg (max_tokens 1, kv_transfer_params do_remote_decode) to a prefill worker and the decode leg with the
returned kv_transfer_params to a decode worker itself, so it runs against the prefill and decode pods directly
(no sidecar).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import aiohttp

from extproc.netutil import free_port

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class PeerSpec:
    name: str
    binary: str
    subcommand: tuple[str, ...]
    policy: str
    pd: bool = False  # vllm-router's P/D mode (the fleet is split into prefill and decode pods)
    prefill_policy: str = ""
    decode_policy: str = ""


PEERS: dict[str, PeerSpec] = {
    "vllm-router-rr": PeerSpec("vllm-router-rr", "vllm-router", (), "round_robin"),
    "vllm-router-p2c": PeerSpec("vllm-router-p2c", "vllm-router", (), "power_of_two"),
    "vllm-router-cache": PeerSpec("vllm-router-cache", "vllm-router", (), "cache_aware"),
    "sglang-router-rr": PeerSpec("sglang-router-rr", "sglang-router", ("launch",), "round_robin"),
    "sglang-router-p2c": PeerSpec("sglang-router-p2c", "sglang-router", ("launch",), "power_of_two"),
    "sglang-router-cache": PeerSpec("sglang-router-cache", "sglang-router", ("launch",), "cache_aware"),
    "vllm-router-pd": PeerSpec("vllm-router-pd", "vllm-router", (), "cache_aware", pd=True,
                               prefill_policy="cache_aware", decode_policy="power_of_two"),
}


def find_binary(binary: str) -> str | None:
    """The console script in this interpreter's venv first, then PATH."""
    cand = os.path.join(os.path.dirname(sys.executable), binary)
    if os.path.isfile(cand) and os.access(cand, os.X_OK):
        return cand
    return shutil.which(binary)


def availability(name: str) -> str | None:
    """None if the peer can run here, else the reason it cannot."""
    spec = PEERS.get(name)
    if spec is None:
        return f"unknown peer {name!r}"
    if find_binary(spec.binary) is None:
        return f"'{spec.binary}' is not installed (pip install 'extproc[bench]')"
    return None


class PeerRouter:
    """A running peer router process. ``async with PeerRouter(name, worker_urls) as p: p.url``."""

    def __init__(
        self,
        name: str,
        worker_urls: list[str],
        log_path: str | None = None,
        startup_timeout: float = 60.0,
        prefill_urls: list[str] | None = None,
    ) -> None:
        """``worker_urls``: every worker; in P/D mode the decode workers, with ``prefill_urls`` the prefill ones."""
        spec = PEERS[name]
        if spec.pd and not prefill_urls:
            raise ValueError(f"{name} needs prefill workers (a P/D fleet)")
        self.prefill_urls = list(prefill_urls or [])
        binary = find_binary(spec.binary)
        if binary is None:
            raise RuntimeError(availability(name) or f"{spec.binary} missing")
        self.spec = spec
        self.binary = binary
        self.worker_urls = worker_urls
        self.port = free_port()
        self.prom_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    def command(self) -> list[str]:
        cmd = [self.binary, *self.spec.subcommand, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.spec.pd:
            cmd += ["--vllm-pd-disaggregation"]
            for u in self.prefill_urls:
                cmd += ["--prefill", u, "none"]
            for u in self.worker_urls:
                cmd += ["--decode", u]
            cmd += ["--policy", self.spec.policy, "--prefill-policy", self.spec.prefill_policy,
                    "--decode-policy", self.spec.decode_policy]
        else:
            cmd += ["--worker-urls", *self.worker_urls, "--policy", self.spec.policy]
        cmd += ["--prometheus-port", str(self.prom_port), "--prometheus-host", "127.0.0.1"]
        # No admission queue in front of the pods (the other setups have none either).
        cmd += ["--max-concurrent-requests", "100000", "--request-timeout-secs", "600"]
        return cmd

    def config(self) -> dict[str, object]:
        return {"proxy": self.spec.binary, "policy": self.spec.policy, "command": " ".join(self.command()[1:])}

    async def __aenter__(self) -> "PeerRouter":
        cmd = self.command()
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log_file = out if self.log_path else None
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        async with aiohttp.ClientSession() as s:
            while loop.time() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} at start (log: {self.log_path})")
                try:
                    async with s.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.spec.name} not healthy after {self.startup_timeout:.0f} s (log: {self.log_path})")

    async def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            for _ in range(50):
                if p.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if p.poll() is None:
                p.kill()
                p.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
