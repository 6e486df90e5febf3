"""The scheduling framework: plugin protocols, per-request cycle state, and the profile runner.

A profile = filters (in order) → scorers (each 0..1 per candidate, clamped, × weight, summed) → one picker.
A profile handler chooses which profiles run and merges their results. Plugins are plain objects that satisfy
one or more of the protocols below; the same objects run in the ext_proc server, the virtual-time benchmark
and the tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint, EndpointPool


class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle (e.g. prefix hashes computed by
    a scorer and reused by its pre-request hook)."""

    __slots__ = ("data", "started")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.started = time.perf_counter()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value


@runtime_checkable
class Plugin(Protocol):
    """Every plugin has a type (its registry name) and an instance name (unique in a config)."""

    type_name: ClassVar[str]
    name: str


@runtime_checkable
class Filter(Plugin, Protocol):
    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]: ...


@runtime_checkable
class Scorer(Plugin, Protocol):
    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[float]:
        """One score per candidate, in candidate order. Values outside 0..1 are clamped by the framework."""


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@runtime_checkable
class Picker(Plugin, Protocol):
    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        """Ordered picks: the first is the target, the rest are fallbacks. Empty means no pick."""


@runtime_checkable
class PreRequest(Plugin, Protocol):
    """Called once the request is dispatched to ``result.primary`` (e.g. optimistic prefix-index insert)."""

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: "SchedulingResult") -> None: ...


@dataclass(slots=True)
class Observation:
    """What one routed request did, for response-side plugins and the latency predictor."""

    request_id: str
    endpoint: str
    model: str
    prompt_tokens: int
    dispatch_ts: float  # time.monotonic()
    first_token_ts: float = 0.0
    complete_ts: float = 0.0
    output_tokens: int = 0
    status: int = 0
    error: str = ""
    features: Any = None  # the predictor's feature row for the chosen pod at decision time, if any

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ts - self.dispatch_ts) * 1000.0 if self.first_token_ts else 0.0

    @property
    def e2e_ms(self) -> float:
        return (self.complete_ts - self.dispatch_ts) * 1000.0 if self.complete_ts else 0.0

    @property
    def tpot_ms(self) -> float:
        if self.output_tokens > 1 and self.first_token_ts and self.complete_ts:
            return (self.complete_ts - self.first_token_ts) * 1000.0 / (self.output_tokens - 1)
        return 0.0


@runtime_checkable
class ResponseObserver(Plugin, Protocol):
    """Called when a dispatched request finishes in any way (success, error status, disconnect)."""

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None: ...


class SchedulingError(Exception):
    """No pick could be made; carries the HTTP status the client gets (503 no candidate, 429 shed, 404 model)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class ProfileResult:
    profile: str
    targets: list[Endpoint]
    scores: dict[str, float] = field(default_factory=dict)  # address → total weighted score (for debugging/tests)


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileResult]
    primary_profile: str

    @property
    def targets(self) -> list[Endpoint]:
        return self.profile_results[self.primary_profile].targets

    @property
    def primary(self) -> Endpoint:
        return self.targets[0]


class SchedulingProfile:
    """filters → weighted scorers → picker."""

    __slots__ = ("name", "filters", "scorers", "picker", "plugin_timer")

    def __init__(self, name: str, filters: list[Filter], scorers: list[WeightedScorer], picker: Picker) -> None:
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        self.plugin_timer: Any = None  # optional callable(plugin_name, seconds) installed by observe.metrics

    def run(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> ProfileResult:
        timer = self.plugin_timer
        for f in self.filters:
            t0 = time.perf_counter()
            candidates = f.filter(cycle, request, candidates)
            if timer is not None:
                timer(f.name, time.perf_counter() - t0)
            if not candidates:
                return ProfileResult(self.name, [])
        n = len(candidates)
        totals = [0.0] * n
        for ws in self.scorers:
            t0 = time.perf_counter()
            scores = ws.scorer.score(cycle, request, candidates)
            if timer is not None:
                timer(ws.scorer.name, time.perf_counter() - t0)
            w = ws.weight
            for i in range(n):
                s = scores[i]
                if s != s:  # NaN → 0
                    s = 0.0
                elif s < 0.0:
                    s = 0.0
                elif s > 1.0:
                    s = 1.0
                totals[i] += w * s
        scored = [ScoredEndpoint(candidates[i], totals[i]) for i in range(n)]
        t0 = time.perf_counter()
        targets = self.picker.pick(cycle, request, scored)
        if timer is not None:
            timer(self.picker.name, time.perf_counter() - t0)
        return ProfileResult(self.name, targets, {s.endpoint.address: s.score for s in scored})


@runtime_checkable
class ProfileHandler(Plugin, Protocol):
    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profiles: dict[str, SchedulingProfile],
        results: dict[str, ProfileResult],
    ) -> list[SchedulingProfile]:
        """Profiles to run next given results so far; empty list ends the loop."""

    def process_results(
        self, cycle: CycleState, request: InferenceRequest, results: dict[str, ProfileResult]
    ) -> SchedulingResult: ...


class SingleProfileHandler:
    """Runs one profile (the named one, or the only one)."""

    type_name: ClassVar[str] = "single-profile-handler"

    def __init__(self, name: str = "single-profile-handler", profile: str | None = None) -> None:
        self.name = name
        self.profile = profile

    def pick_profiles(self, cycle, request, profiles, results):  # type: ignore[no-untyped-def]
        if results:
            return []
        if self.profile is not None:
            return [profiles[self.profile]]
        return [next(iter(profiles.values()))]

    def process_results(self, cycle, request, results):  # type: ignore[no-untyped-def]
        name = next(iter(results))
        return SchedulingResult(results, name)


@dataclass(slots=True)
class Scheduler:
    """Runs the profile handler's profiles over the candidate endpoints for one request.

    Candidates are the pool's endpoints that are not removed; filters (healthy, serves-model, ...) narrow them.
    """

    pool: EndpointPool
    profiles: dict[str, SchedulingProfile]
    handler: ProfileHandler
    pre_request: list[PreRequest] = field(default_factory=list)
    observers: list[ResponseObserver] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def schedule(self, request: InferenceRequest, cycle: CycleState | None = None) -> tuple[SchedulingResult, CycleState]:
        cycle = cycle or CycleState()
        candidates = list(self.pool.snapshot())
        if not candidates:
            raise SchedulingError(503, "no model-server endpoints are known", "no_endpoints")
        results: dict[str, ProfileResult] = {}
        for _ in range(16):  # bound the profile loop
            todo = self.handler.pick_profiles(cycle, request, self.profiles, results)
            if not todo:
                break
            for profile in todo:
                results[profile.name] = profile.run(cycle, request, candidates)
        if not results:
            raise SchedulingError(503, "no scheduling profile ran", "no_profile")
        result = self.handler.process_results(cycle, request, results)
        if not result.profile_results.get(result.primary_profile) or not result.targets:
            raise SchedulingError(503, f"no healthy endpoint can serve model '{request.target_model}'", "no_candidate")
        return result, cycle

    def dispatched(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        for hook in self.pre_request:
            hook.pre_request(cycle, request, result)

    def completed(self, request: InferenceRequest, observation: Observation) -> None:
        for obs in self.observers:
            obs.on_complete(request, observation)
