"""Helpers for the built-in plugin tests: hand-built endpoints and requests, no network."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from extproc.api import InferenceRequest, parse_request
from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics
from extproc.scheduling.framework import CycleState, ProfileResult, SchedulingResult, ScoredEndpoint
from extproc.scheduling.registry import PluginContext

MODEL = "base-model"


def make_endpoint(i: int, models: Iterable[str] = (MODEL,), **metrics: Any) -> Endpoint:
    e = Endpoint(f"10.0.0.{i}:8000", models=models)
    e.metrics = PodMetrics(**metrics)
    return e


def make_request(prompt: str = "hello", model: str = MODEL, headers: dict[str, str] | None = None) -> InferenceRequest:
    body = json.dumps({"model": model, "prompt": prompt}).encode()
    return parse_request("/v1/completions", body, headers or {})


def result_for(endpoint: Endpoint) -> SchedulingResult:
    return SchedulingResult({"default": ProfileResult("default", [endpoint])}, "default")


def scored(endpoints: list[Endpoint], scores: list[float]) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(e, s) for e, s in zip(endpoints, scores)]


@pytest.fixture
def ctx() -> PluginContext:
    return PluginContext(pool=EndpointPool(default_models=frozenset({MODEL})), config_path="test.yaml")


@pytest.fixture
def cycle() -> CycleState:
    return CycleState()


EndpointFactory = Callable[..., Endpoint]
