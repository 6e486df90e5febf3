"""KubernetesDiscovery against a local API server speaking the list/watch protocol (k8s_fake.FakeApiServer)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from k8s_fake import FakeApiServer, eventually, make_pod, make_pool

from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kubernetes import DiscoveryConfig, KubernetesDiscovery, add_discovery_arguments, discovery_from_args
from extproc.scheduling.config import load_config
from extproc.scheduling.framework import SchedulingError

pytestmark = pytest.mark.timeout(30)


def addrs(pool: EndpointPool) -> set[str]:
    return {e.address for e in pool.snapshot()}


@pytest.fixture
async def make_discovery(apiserver: FakeApiServer, tmp_path: Path) -> AsyncIterator[Callable[..., KubernetesDiscovery]]:
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig")
    made: list[KubernetesDiscovery] = []

    def _make(pool: EndpointPool | None = None, **kw: object) -> KubernetesDiscovery:
        kw.setdefault("namespace", "default")
        kw.setdefault("backoff_base_s", 0.01)
        kw.setdefault("backoff_cap_s", 0.05)
        cfg = DiscoveryConfig(kubeconfig=str(kubeconfig), **kw)  # type: ignore[arg-type]
        d = KubernetesDiscovery(cfg, pool if pool is not None else EndpointPool())
        made.append(d)
        return d

    yield _make
    for d in made:
        await d.stop()


async def test_standalone_initial_list_filters_by_readiness(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    apiserver.put("pods", make_pod("b", "10.0.0.2", ready=False))
    apiserver.put("pods", make_pod("c", "10.0.0.3", terminating=True))
    apiserver.put("pods", make_pod("d", None, phase="Pending", ready=False))
    apiserver.put("pods", make_pod("e", "10.0.0.5", labels={"app": "other"}))
    apiserver.put("pods", make_pod("f", "10.0.0.6", labels={"app": "vllm", "pod-class": "prefill"}))
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000, 8001))
    await d.start()
    assert d.synced.is_set()
    await apiserver.wait_watchers("pods")
    assert addrs(pool) == {"10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.6:8000", "10.0.0.6:8001"}
    assert pool.get("10.0.0.6:8000").pod_class == "prefill"  # type: ignore[union-attr]
    assert pool.get("10.0.0.1:8000").pod_class == "default"  # type: ignore[union-attr]
    assert pool.get("10.0.0.1:8000").labels["app"] == "vllm"  # type: ignore[union-attr]
    assert d.failure_mode is None  # standalone: no InferencePool
    # the watch asked for bookmarks and resumed from the list's resourceVersion
    watch_q = next(q for r, v, q in apiserver.requests if r == "pods" and v == "watch")
    assert watch_q["allowWatchBookmarks"].lower() == "true"
    assert watch_q["labelSelector"] == "app=vllm"
    list_q = next(q for r, v, q in apiserver.requests if r == "pods" and v == "list")
    assert int(watch_q["resourceVersion"]) >= int(apiserver.history[-1][0])
    assert "watch" not in list_q


async def test_pod_lifecycle_is_applied_live(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    assert addrs(pool) == set()
    await apiserver.wait_watchers("pods")

    apiserver.put("pods", make_pod("a", None, phase="Pending", ready=False))
    apiserver.put("pods", make_pod("a", "10.0.0.1", ready=False))
    apiserver.put("pods", make_pod("b", "10.0.0.2"))
    await eventually(lambda: addrs(pool) == {"10.0.0.2:8000"})

    apiserver.put("pods", make_pod("a", "10.0.0.1"))  # becomes Ready
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"})
    ep_a = pool.get("10.0.0.1:8000")
    assert ep_a is not None

    apiserver.put("pods", make_pod("a", "10.0.0.1", ready=False))  # NotReady
    await eventually(lambda: addrs(pool) == {"10.0.0.2:8000"})
    assert ep_a.removed  # in-flight holders see it removed, never picked again

    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"})
    apiserver.put("pods", make_pod("b", "10.0.0.2", terminating=True))  # terminating
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000"})
    apiserver.delete("pods", "b")
    apiserver.delete("pods", "a")  # deleted
    await eventually(lambda: addrs(pool) == set())


async def test_label_changes(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    await apiserver.wait_watchers("pods")
    assert pool.get("10.0.0.1:8000").pod_class == "default"  # type: ignore[union-attr]

    apiserver.put("pods", make_pod("a", "10.0.0.1", labels={"app": "vllm", "pod-class": "decode"}))
    await eventually(lambda: pool.get("10.0.0.1:8000") is not None and pool.get("10.0.0.1:8000").pod_class == "decode")  # type: ignore[union-attr]

    apiserver.put("pods", make_pod("a", "10.0.0.1", labels={"app": "moved"}))  # leaves the selector
    await eventually(lambda: addrs(pool) == set())
    apiserver.put("pods", make_pod("a", "10.0.0.1", labels={"app": "vllm"}))  # comes back
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000"})


async def test_inference_pool_spec_changes(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("inferencepools", make_pool("pool", selector={"app": "vllm"}, ports=(8000,), failure_mode=None))
    apiserver.put("pods", make_pod("a", "10.0.0.1", labels={"app": "vllm", "tier": "gold"}))
    apiserver.put("pods", make_pod("b", "10.0.0.2", labels={"app": "vllm"}))
    apiserver.put("pods", make_pod("c", "10.0.0.3", labels={"app": "other"}))
    pool = EndpointPool()
    d = make_discovery(pool, pool_name="pool")
    await d.start()
    assert addrs(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert d.failure_mode == "FailClose"  # the CRD default when unset
    pool_q = next(q for r, v, q in apiserver.requests if r == "inferencepools")
    assert pool_q["fieldSelector"] == "metadata.name=pool"

    # other pools in the namespace are not ours
    apiserver.put("inferencepools", make_pool("someone-else", selector={"app": "other"}))

    apiserver.put("inferencepools", make_pool("pool", selector={"app": "vllm"}, ports=(8001,), failure_mode="FailOpen"))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8001", "10.0.0.2:8001"})
    assert d.failure_mode == "FailOpen"

    apiserver.put("inferencepools", make_pool("pool", selector={"app": "vllm", "tier": "gold"}, ports=(8001,)))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8001"})
    apiserver.put("inferencepools", make_pool("pool", selector={"app": "other"}, ports=(8001,)))
    await eventually(lambda: addrs(pool) == {"10.0.0.3:8001"})
    # the pod watch follows the new selector: a new pod of the new selector appears live
    await eventually(lambda: any(w.labels == {"app": "other"} for w in apiserver.watchers if w.resource == "pods"))
    apiserver.put("pods", make_pod("d", "10.0.0.4", labels={"app": "other"}))
    await eventually(lambda: addrs(pool) == {"10.0.0.3:8001", "10.0.0.4:8001"})

    apiserver.delete("inferencepools", "pool")
    await eventually(lambda: addrs(pool) == set())
    assert not d.pool_present
    apiserver.put("inferencepools", make_pool("pool", selector={"app": "vllm"}, ports=(8000,)))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"})


async def test_pool_created_after_start(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    pool = EndpointPool()
    d = make_discovery(pool, pool_name="pool")
    await d.start()
    assert addrs(pool) == set() and not d.pool_present
    await apiserver.wait_watchers("inferencepools")
    apiserver.put("inferencepools", make_pool("pool"))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000"})


async def test_410_gone_relists(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    apiserver.put("pods", make_pod("b", "10.0.0.2"))
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    await apiserver.wait_watchers("pods")
    lists_before = apiserver.count("pods", "list")
    ep_b = pool.get("10.0.0.2:8000")

    apiserver.expire()  # live watch gets ERROR 410; history before now is compacted
    # changes the client never saw as events: only a fresh LIST can reveal them
    apiserver.put("pods", make_pod("c", "10.0.0.3"))
    apiserver.objects["pods"].pop(("default", "b"))
    await eventually(lambda: apiserver.count("pods", "list") > lists_before)
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000", "10.0.0.3:8000"})
    assert ep_b is not None and ep_b.removed
    assert pool.get("10.0.0.1:8000") is not None and not pool.get("10.0.0.1:8000").removed  # type: ignore[union-attr]
    # and it keeps watching after the re-list
    await apiserver.wait_watchers("pods")
    apiserver.put("pods", make_pod("d", "10.0.0.4"))
    await eventually(lambda: "10.0.0.4:8000" in addrs(pool))


async def test_http_410_on_watch_relists(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    await apiserver.wait_watchers("pods")
    lists_before = apiserver.count("pods", "list")
    apiserver.fail_next(410)
    apiserver.drop_watches()
    await eventually(lambda: apiserver.count("pods", "list") > lists_before)
    await apiserver.wait_watchers("pods")
    apiserver.put("pods", make_pod("b", "10.0.0.2"))
    await eventually(lambda: addrs(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"})


async def test_dropped_watch_resumes_without_relist(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    await apiserver.wait_watchers("pods")
    apiserver.bookmark()
    lists_before = apiserver.count("pods", "list")
    watches_before = apiserver.count("pods", "watch")

    apiserver.drop_watches()
    # events while disconnected are replayed from the resourceVersion the client resumes at
    apiserver.put("pods", make_pod("b", "10.0.0.2"))
    apiserver.delete("pods", "a")
    await eventually(lambda: addrs(pool) == {"10.0.0.2:8000"})
    assert apiserver.count("pods", "watch") > watches_before
    assert apiserver.count("pods", "list") == lists_before
    resumed = [q for r, v, q in apiserver.requests if r == "pods" and v == "watch"][-1]
    assert resumed["resourceVersion"] != ""


async def test_api_errors_back_off_and_recover(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    apiserver.put("pods", make_pod("a", "10.0.0.1"))
    apiserver.fail_next(500, 503, 429)
    pool = EndpointPool()
    d = make_discovery(pool, selector={"app": "vllm"}, target_ports=(8000,))
    await d.start()
    assert addrs(pool) == {"10.0.0.1:8000"}
    assert apiserver.count("pods", "list") == 4  # three failures, then success


async def test_unreachable_api_server_does_not_block_start(tmp_path: Path) -> None:
    srv = FakeApiServer()
    await srv.start()
    kubeconfig = srv.kubeconfig(tmp_path / "kubeconfig")
    await srv.close()  # nothing listens there any more
    pool = EndpointPool()
    d = KubernetesDiscovery(
        DiscoveryConfig(namespace="default", selector={"app": "vllm"}, target_ports=(8000,), kubeconfig=str(kubeconfig), initial_sync_timeout_s=0.2, backoff_cap_s=0.05),
        pool,
    )
    try:
        await d.start()
        assert not d.synced.is_set()
        assert len(pool) == 0
    finally:
        await d.stop()


async def test_no_request_routed_to_removed_pod_under_churn(apiserver: FakeApiServer, make_discovery: Callable[..., KubernetesDiscovery]) -> None:
    for i in range(4):
        apiserver.put("pods", make_pod(f"p{i}", f"10.0.1.{i}"))
    pool = EndpointPool(default_models=frozenset({"m"}))
    d = make_discovery(pool, pool_name="pool")
    apiserver.put("inferencepools", make_pool("pool"))
    await d.start()
    await apiserver.wait_watchers("pods")
    cfg = load_config("default", pool)
    body = json.dumps({"model": "m", "prompt": "hello"}).encode()

    # The model of what the scheduler has "seen": the set of pods that are gone according to the pool
    # (addresses removed by an applied update). Anything scheduled after must not be among them.
    removed_seen: set[str] = set()
    pool.add_listener(lambda added, removed: (removed_seen.update(e.address for e in removed), removed_seen.difference_update(e.address for e in added)))
    routed = 0
    violations: list[str] = []
    stop = asyncio.Event()

    async def scheduler_loop() -> None:
        nonlocal routed
        while not stop.is_set():
            try:
                result, _ = cfg.scheduler.schedule(parse_request("/v1/completions", body))
            except SchedulingError:
                await asyncio.sleep(0)
                continue
            for ep in result.targets:
                if ep.removed or ep.address in removed_seen:
                    violations.append(ep.address)
            routed += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(scheduler_loop())
    try:
        n = 4
        for step in range(40):
            # churn: new pod becomes ready, an old one goes NotReady / terminating / deleted, labels move
            apiserver.put("pods", make_pod(f"p{n}", f"10.0.1.{n}"))
            old = f"p{n - 4}"
            kind = step % 3
            if kind == 0:
                apiserver.put("pods", make_pod(old, f"10.0.1.{n - 4}", ready=False))
            elif kind == 1:
                apiserver.put("pods", make_pod(old, f"10.0.1.{n - 4}", terminating=True))
            else:
                apiserver.delete("pods", old)
            n += 1
            await asyncio.sleep(0.002)
        want = {f"10.0.1.{i}:8000" for i in range(n - 4, n)}
        await eventually(lambda: addrs(pool) == want)
        routed_before = routed
        await eventually(lambda: routed > routed_before + 20)
    finally:
        stop.set()
        await task
    assert violations == []
    assert routed > 0


def test_cli_flags_build_discovery(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoints", default="")
    p.add_argument("--endpoints-file", default=None)
    add_discovery_arguments(p)
    pool = EndpointPool()
    assert discovery_from_args(p.parse_args([]), pool) is None
    d = discovery_from_args(p.parse_args(["--endpoint-selector", "app=vllm,tier=a", "--target-ports", "8000,8001", "--namespace", "ns1"]), pool)
    assert d is not None
    assert d.cfg.selector == {"app": "vllm", "tier": "a"}
    assert d.cfg.target_ports == (8000, 8001)
    assert d.cfg.namespace == "ns1"
    d = discovery_from_args(p.parse_args(["--pool", "vllm-llama3-8b", "--namespace", "ns1", "--kubeconfig", str(tmp_path / "k")]), pool)
    assert d is not None and d.cfg.pool_name == "vllm-llama3-8b" and d.cfg.kubeconfig == str(tmp_path / "k")
    with pytest.raises(SystemExit):
        discovery_from_args(p.parse_args(["--pool", "x", "--endpoint-selector", "app=vllm"]), pool)
    with pytest.raises(SystemExit):
        discovery_from_args(p.parse_args(["--endpoint-selector", "app=vllm"]), pool)  # no ports
    with pytest.raises(SystemExit):
        discovery_from_args(p.parse_args(["--target-ports", "8000"]), pool)  # no selector
    with pytest.raises(SystemExit):
        discovery_from_args(p.parse_args(["--pool", "x", "--endpoints", "1.2.3.4:80"]), pool)
    with pytest.raises(SystemExit):
        discovery_from_args(p.parse_args(["--pool", "x", "--in-cluster", "--kubeconfig", "k"]), pool)
