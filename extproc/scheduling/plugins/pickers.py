"""Pickers: turn the weighted scores of one profile into an ordered list of targets (primary + fallbacks).

- ``max-score-picker``: the highest total score, ties broken uniformly at random; with ``maxNumOfEndpoints`` N > 1
  the top N in score order (ties in random order) are returned as fallbacks.
- ``random-picker``: N endpoints uniformly at random, ignoring scores.
- ``weighted-random-picker``: weighted sampling without replacement by A-Res (Efraimidis–Spirakis):
  key = U^(1/score), the N largest keys win. Zero-score endpoints come only after every positive one (and when
  all scores are zero it degrades to the random picker).

GIE reference: pkg/epp/scheduling/framework/plugins/picker/{max_score,random,weighted_random}_picker.go. All three
accept an optional integer ``seed`` (reproducible simulations and tests); without it they draw from the OS.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    ScoredEndpoint,
    check_keys,
    get_int,
    get_seed,
    register,
)

DEFAULT_MAX_NUM_OF_ENDPOINTS = 1
_PARAMS = ("maxNumOfEndpoints", "seed")


class _PickerBase:
    type_name: ClassVar[str] = ""
    __slots__ = ("name", "max_endpoints", "rng")

    def __init__(self, name: str, max_endpoints: int = DEFAULT_MAX_NUM_OF_ENDPOINTS, seed: int | None = None) -> None:
        if max_endpoints < 1:
            raise ValueError(f"parameter 'maxNumOfEndpoints' must be >= 1, got {max_endpoints}")
        self.name = name
        self.max_endpoints = max_endpoints
        self.rng = random.Random(seed)

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> Any:
        check_keys(params, _PARAMS)
        return cls(
            name,
            get_int(params, "maxNumOfEndpoints", DEFAULT_MAX_NUM_OF_ENDPOINTS, minimum=1),
            get_seed(params),
        )


def _random_pick(rng: random.Random, scored: list[ScoredEndpoint], n: int) -> list[Endpoint]:
    if not scored:
        return []
    if n == 1:
        return [scored[rng.randrange(len(scored))].endpoint]
    return [s.endpoint for s in rng.sample(scored, min(n, len(scored)))]


@register
class MaxScorePicker(_PickerBase):
    type_name: ClassVar[str] = "max-score-picker"
    __slots__ = ()

    def __init__(self, name: str = "max-score-picker", max_endpoints: int = DEFAULT_MAX_NUM_OF_ENDPOINTS, seed: int | None = None) -> None:
        super().__init__(name, max_endpoints, seed)

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        if self.max_endpoints == 1:
            best = max(s.score for s in scored)
            ties = [s.endpoint for s in scored if s.score == best]
            if len(ties) == 1:
                return ties
            return [ties[self.rng.randrange(len(ties))]]
        order = list(scored)
        self.rng.shuffle(order)  # random order among equal scores (the sort below is stable)
        order.sort(key=lambda s: s.score, reverse=True)
        return [s.endpoint for s in order[: self.max_endpoints]]


@register
class RandomPicker(_PickerBase):
    type_name: ClassVar[str] = "random-picker"
    __slots__ = ()

    def __init__(self, name: str = "random-picker", max_endpoints: int = DEFAULT_MAX_NUM_OF_ENDPOINTS, seed: int | None = None) -> None:
        super().__init__(name, max_endpoints, seed)

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        return _random_pick(self.rng, scored, self.max_endpoints)


@register
class WeightedRandomPicker(_PickerBase):
    type_name: ClassVar[str] = "weighted-random-picker"
    __slots__ = ()

    def __init__(
        self, name: str = "weighted-random-picker", max_endpoints: int = DEFAULT_MAX_NUM_OF_ENDPOINTS, seed: int | None = None
    ) -> None:
        super().__init__(name, max_endpoints, seed)

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        rnd = self.rng.random
        log = math.log
        # A-Res key U^(1/w), compared as log(U)/w (same order, no underflow for small w). U ∈ (0, 1].
        # Zero scores get -inf and therefore only follow every positive-score endpoint.
        keys = [log(1.0 - rnd()) / s.score if s.score > 0.0 else -math.inf for s in scored]
        n = self.max_endpoints
        if n == 1:
            best = max(range(len(keys)), key=keys.__getitem__)
            if keys[best] == -math.inf:
                return _random_pick(self.rng, scored, 1)
            return [scored[best].endpoint]
        if max(keys) == -math.inf:
            return _random_pick(self.rng, scored, n)
        idx = list(range(len(scored)))
        self.rng.shuffle(idx)  # random order among the zero-score tail
        idx.sort(key=keys.__getitem__, reverse=True)
        return [scored[i].endpoint for i in idx[:n]]
