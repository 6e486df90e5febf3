"""A fleet of simulated vLLM pods in one process (one asyncio loop, one port per pod).

::

    spec = FleetSpec(pods=4, profile="llama3-8b-h100")            # or fleet="llama3-8b-h100:4,llama3-8b-l40s:4"
    async with SimFleet(spec) as fleet:
        fleet.endpoints     # ["127.0.0.1:port", ...]
        fleet.pods          # [SimPod, ...]: .address .profile .engine .kv_events_endpoint .replay_endpoint .topic
        fleet.labels        # {address: {"accelerator": the profile's accelerator}} (+ "llm-d.ai/role" in a P/D fleet)

P/D: ``FleetSpec(pods=8, prefill_pods=4)`` makes the first 4 pods prefill-role and the rest decode-role, every
pod with vLLM's NixlConnector (kv_role kv_both) over ``link``; see ``extproc.sim.kvtransfer``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType

from extproc.sim.profiles import Profile, get_profile, parse_fleet
from extproc.sim.server import SimPod

__all__ = ["FleetSpec", "SimFleet", "SimPod", "ROLE_LABEL"]

ROLE_LABEL = "llm-d.ai/role"


@dataclass(frozen=True, slots=True)
class FleetSpec:
    pods: int = 4
    profile: str = "llama3-8b-h100"
    fleet: str | None = None
    model: str = "sim-llama"
    loras: tuple[str, ...] = ()
    kv_events: bool = False
    kv_blocks: int | None = None
    host: str = "127.0.0.1"
    base_port: int = 0
    seed: int = 0
    time_scale: float = 1.0
    kv_events_array_encoding: bool = False
    kv_events_connect: str | None = None  # every pod publishes to this endpoint (a scheduler's shared bind)
    prefill_pods: int = 0  # > 0: a P/D fleet (that many prefill-role pods first, the rest decode-role)
    link: str = "rdma-400g"
    kv_failure_rate: float = 0.0
    kv_load_failure_policy: str = "fail"

    def roles(self, n: int) -> list[str]:
        if self.prefill_pods <= 0:
            return ["both"] * n
        if self.prefill_pods >= n:
            raise ValueError(f"a P/D fleet needs at least one decode pod ({self.prefill_pods} prefill of {n} pods)")
        return ["prefill"] * self.prefill_pods + ["decode"] * (n - self.prefill_pods)

    def profiles(self) -> list[Profile]:
        """One profile per pod, in pod order, with the ``kv_blocks`` override applied."""
        if self.fleet:
            names = [name for name, count in parse_fleet(self.fleet) for _ in range(count)]
        else:
            if self.pods <= 0:
                raise ValueError("pods must be > 0")
            names = [self.profile] * self.pods
        out: list[Profile] = []
        for n in names:
            p = get_profile(n)
            if self.kv_blocks is not None:
                if self.kv_blocks <= 0:
                    raise ValueError("kv_blocks must be > 0")
                p = p.replace(num_gpu_blocks=self.kv_blocks)
            out.append(p)
        return out


class SimFleet:
    def __init__(self, spec: FleetSpec) -> None:
        if spec.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.spec = spec
        profs = spec.profiles()
        roles = spec.roles(len(profs))
        self.pods: list[SimPod] = [
            SimPod(
                prof,
                model=spec.model,
                loras=tuple(spec.loras),
                host=spec.host,
                port=(spec.base_port + i) if spec.base_port else 0,
                seed=spec.seed + i,
                time_scale=spec.time_scale,
                kv_events=spec.kv_events,
                kv_events_array_encoding=spec.kv_events_array_encoding,
                kv_events_connect=spec.kv_events_connect,
                role=roles[i],
                kv_connector=spec.prefill_pods > 0,
                link=spec.link,
                kv_failure_rate=spec.kv_failure_rate,
                kv_load_failure_policy=spec.kv_load_failure_policy,
            )
            for i, prof in enumerate(profs)
        ]
        self._started = False

    @property
    def endpoints(self) -> list[str]:
        return [p.address for p in self.pods]

    @property
    def labels(self) -> dict[str, dict[str, str]]:
        # what a real pod exposes: its hardware (the node's accelerator label), not the simulator's profile name;
        # in a P/D fleet also its llm-d.ai/role
        out: dict[str, dict[str, str]] = {}
        for p in self.pods:
            lab = {"accelerator": p.profile.accelerator}
            if p.kv_connector:
                lab[ROLE_LABEL] = p.role
            out[p.address] = lab
        return out

    @property
    def kv_events(self) -> dict[str, dict[str, str | None]]:
        return {
            p.address: {"endpoint": p.kv_events_endpoint, "replay": p.replay_endpoint, "topic": p.topic}
            for p in self.pods
            if p.kv_events_endpoint and not p.kv_events_connect  # connect mode: nothing of its own to subscribe to
        }

    def pod(self, address: str) -> SimPod:
        for p in self.pods:
            if p.address == address:
                return p
        raise KeyError(address)

    async def start(self) -> None:
        if self._started:
            return
        try:
            for p in self.pods:
                await p.start()
        except BaseException:
            await self.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.pods), return_exceptions=True)
        self._started = False

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
