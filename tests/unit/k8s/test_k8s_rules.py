"""Pure rules of Kubernetes discovery: pod readiness, selectors, InferencePool parsing, backoff."""

from __future__ import annotations

import random

import pytest
from k8s_fake import make_pod, make_pool

from extproc.datalayer.kubernetes import (
    Backoff,
    DiscoveryError,
    endpoints_for_pods,
    parse_pool,
    parse_selector,
    parse_target_ports,
    pod_is_ready,
    selector_matches,
)


@pytest.mark.parametrize(
    ("pod", "ready"),
    [
        (make_pod("a", "10.0.0.1"), True),
        (make_pod("a", "10.0.0.1", ready=False), False),
        (make_pod("a", "10.0.0.1", terminating=True), False),
        (make_pod("a", None), False),
        (make_pod("a", "10.0.0.1", phase="Pending"), False),
        (make_pod("a", "10.0.0.1", phase="Succeeded"), False),
        (make_pod("a", "10.0.0.1", phase="Failed"), False),
        ({"metadata": {"name": "a"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}, False),  # no conditions
        ({"metadata": {"name": "a"}, "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "Unknown"}]}}, False),
        ({"metadata": {"name": "a"}}, False),
    ],
)
def test_pod_is_ready(pod: dict, ready: bool) -> None:
    assert pod_is_ready(pod) is ready


def test_endpoints_cross_ports_and_labels() -> None:
    pods = {
        "b": make_pod("b", "10.0.0.2", labels={"app": "vllm", "llm-d.ai/role": "decode"}),
        "a": make_pod("a", "10.0.0.1", labels={"app": "vllm", "pod-class": "prefill"}),
        "c": make_pod("c", "10.0.0.3", ready=False),
        "d": make_pod("d", "fd00::4"),
        "e": make_pod("e", "10.0.0.5", labels={"app": "x"}),
    }
    addresses, labels = endpoints_for_pods(pods, {"app": "vllm"}, (8000, 8001))
    assert addresses == ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001", "[fd00::4]:8000", "[fd00::4]:8001"]
    assert labels["10.0.0.1:8000"]["pod-class"] == "prefill"
    assert labels["10.0.0.2:8001"]["pod-class"] == "decode"
    assert labels["[fd00::4]:8000"]["pod-class"] == "default"
    assert labels["10.0.0.2:8000"]["app"] == "vllm"


def test_selectors() -> None:
    assert parse_selector("app=vllm, tier==gold") == {"app": "vllm", "tier": "gold"}
    for bad in ("", "app", "app!=x", "=x"):
        with pytest.raises(DiscoveryError):
            parse_selector(bad)
    assert selector_matches({"app": "vllm"}, {"app": "vllm", "x": "y"})
    assert not selector_matches({"app": "vllm"}, {"app": "other"})
    assert not selector_matches({"app": "vllm"}, None)
    assert parse_target_ports("8000, 8001,8000") == (8000, 8001)
    for bad in ("", "0", "70000", "http"):
        with pytest.raises(DiscoveryError):
            parse_target_ports(bad)


def test_parse_pool() -> None:
    spec = parse_pool(make_pool("p", selector={"app": "vllm"}, ports=(8000,), failure_mode="FailOpen"))
    assert spec.selector == {"app": "vllm"}
    assert spec.target_ports == (8000,)
    assert spec.failure_mode == "FailOpen"
    assert spec.picker_service == "p-epp" and spec.picker_port == 9002
    assert parse_pool(make_pool("p", failure_mode=None)).failure_mode == "FailClose"
    bad_mode = make_pool("p")
    bad_mode["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    no_ports = make_pool("p")
    no_ports["spec"]["targetPorts"] = []
    no_selector = make_pool("p")
    no_selector["spec"]["selector"] = {}
    bad_port = make_pool("p")
    bad_port["spec"]["targetPorts"] = [{"number": 0}]
    for obj in (bad_mode, no_ports, no_selector, bad_port):
        with pytest.raises(DiscoveryError):
            parse_pool(obj)


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    ceilings = [min(1.0, 0.1 * 2**i) for i in range(12)]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    assert max(delays[6:]) > 0.1  # grows past the base
    b.reset()
    assert b.next_delay() <= 0.1
