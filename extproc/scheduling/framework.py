"""The scheduling framework: plugin protocols and the profile runner (cycle state: :mod:`extproc.cycle`).

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
from extproc.cycle import (  # re-exported: the per-request records live below scheduling (the predictor uses them)
    PD_STAGE,
    PD_STAGE_DECODE,
    PD_STAGE_ENCODE,
    PD_STAGE_PREFILL,
    PEER_ENDPOINT,
    PREDICTOR_FEATURES,
    PREDICTOR_PREFILL_FEATURES,
    PREFIX_BLOCK_SIZE,
    PREFIX_CACHED_TOKENS,
    PREFIX_MATCHED_BLOCKS,
    PREFIX_SCORES,
    PREFIX_TOTAL_BLOCKS,
    PROMPT_TOKEN_IDS,
    CycleKey,
    CycleState,
    Observation,
)
from extproc.datalayer.endpoint import Endpoint, EndpointPool

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

    @property
    def error_type(self) -> str:
        """The OpenAI error ``type`` for this status."""
        return _ERROR_TYPES.get(self.status, "service_unavailable")


_ERROR_TYPES = {400: "invalid_request_error", 404: "NotFoundError", 429: "rate_limit_error"}


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class ProfileResult:
    profile: str
    targets: list[Endpoint]
    scores: dict[str, float] = field(default_factory=dict)  # address → total weighted score (for debugging/tests)


# What profiles produced so far in one cycle: name → result. A handler may store ``None`` under a profile it
# evaluated and decided to skip (the reference's "nil result"), so it does not ask again on the next round.
ProfileResults = dict[str, "ProfileResult | None"]


@dataclass(slots=True)
class SchedulingResult:
    """The outcome of one cycle: every profile result that counts, which one is primary (its first target is the
    routing destination, the rest fallbacks), and extra request headers for the upstream (e.g. the P/D handler's
    ``x-prefiller-host-port``). Only header names the handler declares in ``owned_headers`` may appear here."""

    profile_results: dict[str, ProfileResult]
    primary_profile: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def targets(self) -> list[Endpoint]:
        return self.profile_results[self.primary_profile].targets

    @property
    def primary(self) -> Endpoint:
        return self.targets[0]

    def endpoints(self) -> list[tuple[str, Endpoint]]:
        """(profile, first target) of every profile that picked something, primary first."""
        out = [(self.primary_profile, self.primary)]
        for name, r in self.profile_results.items():
            if name != self.primary_profile and r.targets:
                out.append((name, r.targets[0]))
        return out


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
    """Chooses which scheduling profiles run for a request and combines their results.

    The scheduler calls ``pick_profiles`` repeatedly (at most 16 rounds) with the results so far, running what it
    returns, until it returns an empty list; then ``process_results`` builds the :class:`SchedulingResult`
    (primary profile + extra upstream headers). Either may raise :class:`SchedulingError` with a precise status
    (e.g. 400 for a header naming no profile). ``owned_headers`` lists the request headers the handler may set on
    the upstream request; the server strips them from every client request so a client can never set them itself.
    ``configure(profiles)`` is called once by the config loader
    with the configured profiles and raises ``ValueError`` if they do not fit the handler.
    """

    owned_headers: ClassVar[tuple[str, ...]]

    def configure(self, profiles: dict[str, "SchedulingProfile"]) -> None: ...

    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profiles: dict[str, "SchedulingProfile"],
        results: ProfileResults,
    ) -> list["SchedulingProfile"]:
        """Profiles to run next given results so far; empty list ends the loop."""

    def process_results(self, cycle: CycleState, request: InferenceRequest, results: ProfileResults) -> SchedulingResult: ...


@runtime_checkable
class FairnessPolicy(Plugin, Protocol):
    """Chooses which fairness key (tenant / program, ``x-gateway-inference-fairness-id``) of a flow-control band is
    served next. ``queues`` maps each waiting key to (queue length, enqueue time of its head, ``time.monotonic()``).
    Referenced from ``flowControl`` (``defaultPriorityBand.fairnessPolicyRef``); without one, keys take turns."""

    def pick_tenant(self, queues: "dict[str, tuple[int, float]]", now: float) -> str: ...


@runtime_checkable
class UsageLimitPolicy(Plugin, Protocol):
    """Flow-control dispatch ceilings by band rank (``flowControl.usageLimitPolicyPluginRef``): given the pool
    saturation level (1.0 = at the detector's thresholds) and the number of priority bands, one ceiling per band,
    highest priority first; a band is held while saturation ≥ its ceiling."""

    def compute_limits(self, saturation: float, bands: int) -> list[float]: ...


@runtime_checkable
class ResponseReporter(Plugin, Protocol):
    """Values reported to the proxy when a response ends (``request-attribute-reporter``): from the response's
    ``usage`` object, a list of (metadata namespace, key, value) the server returns as ext_proc dynamic metadata.
    Runs off the decision path, once per request, when the response body ends (``--response-observe streamed``)."""

    def report(self, request: InferenceRequest, usage: dict[str, Any]) -> list[tuple[str, str, Any]]: ...


@runtime_checkable
class Admitter(Plugin, Protocol):
    """Admission before any profile runs (e.g. ``probabilistic-admitter``): return to admit, raise
    :class:`SchedulingError` (429 for load shedding) to reject. ``candidates`` are the pool's endpoints."""

    def admit(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class Decider(Plugin, Protocol):
    """Decides per request whether an optional stage runs (e.g. ``deciders.prefill`` of the P/D handler).

    ``endpoint`` is the pick of the stage that already ran (the decode pod in decode-first order), or ``None``.
    Must be cheap and non-blocking: it runs on the decision path.
    """

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, endpoint: Endpoint | None) -> bool: ...


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
    admitters: list[Admitter] = field(default_factory=list)
    reporters: list[ResponseReporter] = field(default_factory=list)

    def schedule(
        self, request: InferenceRequest, cycle: CycleState | None = None, allowed: frozenset[str] | None = None
    ) -> tuple[SchedulingResult, CycleState]:
        """``allowed`` (conformance mode only) restricts the candidates to these addresses or bare hosts."""
        cycle = cycle or CycleState()
        candidates = list(self.pool.snapshot())
        if not candidates:
            raise SchedulingError(503, "no model-server endpoints are known", "no_endpoints")
        if allowed is not None:
            candidates = [e for e in candidates if e.address in allowed or e.host in allowed]
            if not candidates:
                raise SchedulingError(503, "no endpoint matches test-epp-endpoint-selection", "no_candidate")
        for admitter in self.admitters:
            admitter.admit(cycle, request, candidates)
        results: ProfileResults = {}
        handler = self.handler
        for _ in range(16):  # bound the profile loop
            todo = handler.pick_profiles(cycle, request, self.profiles, results)
            if not todo:
                break
            for profile in todo:
                results[profile.name] = profile.run(cycle, request, candidates)
        if not any(r is not None for r in results.values()):
            raise SchedulingError(503, "no scheduling profile ran", "no_profile")
        result = handler.process_results(cycle, request, results)
        primary = result.profile_results.get(result.primary_profile)
        if primary is None or not primary.targets:
            raise SchedulingError(503, f"no healthy endpoint can serve model '{request.target_model}'", "no_candidate")
        if result.headers:
            owned = handler.owned_headers
            for k in result.headers:
                if k not in owned:
                    raise SchedulingError(500, f"profile handler '{handler.name}' set header '{k}' it does not declare", "internal_error")
        return result, cycle

    @property
    def owned_headers(self) -> tuple[str, ...]:
        """Request headers the profile handler sets upstream (the server strips them from client requests)."""
        return tuple(self.handler.owned_headers)

    def dispatched(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        for hook in self.pre_request:
            hook.pre_request(cycle, request, result)

    def completed(self, request: InferenceRequest, observation: Observation) -> None:
        for obs in self.observers:
            obs.on_complete(request, observation)
