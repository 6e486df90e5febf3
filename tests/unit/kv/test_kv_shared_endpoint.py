"""One bound KV-event endpoint for every pod (llm-d's ``kvEventsConfig.zmqEndpoint``): vLLM-style publishers connect
to it, the stream tells pods apart by topic ``kv@<pod>@<model>`` and tracks each pod's sequence on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest

from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import KVEventManager, pod_of_topic
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.datalayer.tokenize import Tokenizers
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer
from extproc.sim.fleet import FleetSpec, SimFleet
from extproc.sim.kvcache import BlockStored
from extproc.sim.kvevents import KVEventPublisher

pytestmark = pytest.mark.timeout(60)

MESSAGES = [
    {"role": "system", "content": "You are the routing assistant. Answer tersely and cite the cache state. " * 8},
    {"role": "user", "content": "Which pod holds this prompt?"},
]


def test_pod_of_topic() -> None:
    assert pod_of_topic(b"kv@10.0.0.7@Qwen/Qwen2.5-7B") == "10.0.0.7"
    assert pod_of_topic(b"kv@10.0.0.7:8000@m") == "10.0.0.7:8000"
    assert pod_of_topic(b"kv@@m") is None and pod_of_topic(b"kv") is None and pod_of_topic(b"a@b@c@d") is None


async def _until(pred: Callable[[], bool], what: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, what
        await asyncio.sleep(0.02)


async def test_sim_pods_publishing_to_one_bound_endpoint_are_told_apart_by_topic() -> None:
    pool = EndpointPool(default_models=frozenset({"sim-llama"}))
    index = KVBlockIndex()
    mgr = KVEventManager(pool, index, shared_endpoint="tcp://127.0.0.1:*")
    await mgr.start()
    try:
        assert mgr.shared is not None and mgr.shared.bound_endpoint and not mgr.shared.bound_endpoint.endswith("*")
        async with SimFleet(FleetSpec(pods=3, kv_events=True, kv_events_connect=mgr.shared.bound_endpoint)) as fleet:
            assert fleet.kv_events == {}  # no per-pod publisher to subscribe to: they all connect to ours
            pool.set_endpoints(fleet.endpoints)
            scorer = PrecisePrefixCacheScorer("p", index, Tokenizers({"*": {"kind": "sim"}}), events=mgr)
            async with aiohttp.ClientSession() as http:

                async def ask(pod: str, content: str) -> None:
                    body = {"model": "sim-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
                    async with http.post(f"http://{pod}/v1/chat/completions", json=body) as r:
                        assert r.status == 200
                        await r.read()

                # ZMQ's connect is asynchronous: warm each pod until the stream has heard it
                loop = asyncio.get_running_loop()
                end = loop.time() + 15
                while len(mgr.shared.pods) < 3:
                    assert loop.time() < end, mgr.stats()
                    for i, pod in enumerate(fleet.endpoints):
                        if pod not in mgr.shared.pods:
                            await ask(pod, f"warm-up {i} " * 40)
                    await asyncio.sleep(0.05)
                target = fleet.endpoints[1]
                body = {"model": "sim-llama", "messages": MESSAGES, "max_tokens": 2}
                async with http.post(f"http://{target}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()

            def scores() -> list[float]:
                req = parse_request("/v1/chat/completions", json.dumps(body).encode())
                return list(scorer.score(CycleState(), req, pool.snapshot()))

            await _until(lambda: scores()[1] >= 0.9, (scores(), mgr.stats()))
            s = scores()
            assert s[0] == 0.0 and s[2] == 0.0 and s[1] >= 0.9  # attributed to the pod of the topic, no other
            st = mgr.stats()
            assert st["subscribers"] == 3 and st["batches"] >= 4 and st["decode_errors"] == 0 and st["shared_unknown_pods"] == 0
            assert index.block_size_of(target) == fleet.pod(target).profile.block_size
            # a pod that leaves the pool loses its entries and its sequence tracking
            pool.set_endpoints([e for e in fleet.endpoints if e != target])
            assert target not in mgr.shared.pods and index.block_size_of(target) == 0
    finally:
        await mgr.stop()


async def test_pod_ip_topics_map_to_the_pool_endpoint_and_strangers_are_dropped() -> None:
    """llm-d's vLLM topic carries the pod IP only (``kv@${POD_IP}@model``): it names the pool endpoint on that host.
    A topic of a pod outside the pool changes nothing; a sequence gap resynchronises that pod alone."""
    pool = EndpointPool(default_models=frozenset({"m"}))
    pool.set_endpoints(["127.0.0.11:8000", "127.0.0.12:8000"])
    index = KVBlockIndex()
    mgr = KVEventManager(pool, index, shared_endpoint="tcp://127.0.0.1:*")
    await mgr.start()
    pubs: list[KVEventPublisher] = []
    try:
        assert mgr.shared is not None
        ep = mgr.shared.bound_endpoint
        a = KVEventPublisher("kv@127.0.0.11@m", replay=False, connect=ep)
        b = KVEventPublisher("kv@127.0.0.12@m", replay=False, connect=ep)
        stranger = KVEventPublisher("kv@10.9.9.9@m", replay=False, connect=ep)
        pubs += [a, b, stranger]
        toks = list(range(32))
        keys = index.keys_for(toks, 16)

        def stored(k: list[int], parent: int | None = None) -> BlockStored:
            return BlockStored(k, parent, toks[: 16 * len(k)], 16, None, None)

        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while index.lookup(keys, ["127.0.0.11:8000"]).get("127.0.0.11:8000", 0) < 2 or mgr.shared.unknown_pods == 0:
            assert loop.time() < end, mgr.stats()
            a.publish([stored(keys)])  # re-sent until the connection is up (a duplicate store is idempotent)
            stranger.publish([stored(keys)])
            await asyncio.sleep(0.05)
        assert index.lookup(keys, ["127.0.0.12:8000"]) == {"127.0.0.12:8000": 0}
        assert "10.9.9.9" not in str(index.pods())
        before = mgr.stats()["resyncs"]
        # pod b: its first batch, then a batch three sequence numbers on — a gap with no replay: b resyncs, a does not
        while "127.0.0.12:8000" not in mgr.shared.pods:
            assert loop.time() < end, mgr.stats()
            b.publish([stored(keys[:1])])
            await asyncio.sleep(0.05)
        b._seq += 3
        b.publish([stored(keys[:1])])
        await _until(lambda: mgr.stats()["gaps"] >= 1, mgr.stats())
        assert mgr.stats()["resyncs"] == before + 1
        assert index.lookup(keys, ["127.0.0.11:8000"])["127.0.0.11:8000"] == 2  # the other pod kept its blocks
    finally:
        for p in pubs:
            await p.close()
        await mgr.stop()


def test_llmd_zmq_endpoint_is_a_shared_bind() -> None:
    from pathlib import Path

    from extproc.scheduling.config import load_config

    path = Path(__file__).resolve().parents[2] / "fixtures" / "llmd-configs" / "deploy" / "sim-epp-kvcache-config.yaml"
    pool = EndpointPool()
    pool.set_endpoints(["10.0.0.1:8000"])
    services: dict = {}  # type: ignore[type-arg]
    cfg = load_config(str(path), pool, services)
    mgr = services["kv_events"]
    assert mgr.shared_endpoint == "tcp://0.0.0.0:5557" and mgr.shared_topic_filter == "kv@"
    assert "NOT used" not in (cfg.origins["prefix-cache-scorer"].note or "")
