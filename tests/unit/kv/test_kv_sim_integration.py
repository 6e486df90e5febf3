"""End to end against the simulator: a simulated pod publishes KV events over ZMQ, the manager's subscriber
feeds the index, and the precise scorer then prefers the pod that served the prompt."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import KVEventManager, sources_from_json
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.datalayer.tokenize import Tokenizers
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer
from extproc.sim.fleet import FleetSpec, SimFleet

MESSAGES = [
    {"role": "system", "content": "You are the routing assistant. Answer tersely and cite the cache state. " * 8},
    {"role": "user", "content": "Which pod holds this prompt?"},
]


async def test_index_learns_blocks_from_sim_pod_and_scorer_prefers_it() -> None:
    async with SimFleet(FleetSpec(pods=2, kv_events=True)) as fleet:
        pool = EndpointPool(default_models=frozenset({"sim-llama"}))
        index = KVBlockIndex()
        mgr = KVEventManager(pool, index, sources_from_json(fleet.kv_events))
        await mgr.start()
        try:
            pool.set_endpoints(fleet.endpoints)
            await asyncio.gather(*(s.connected.wait() for s in mgr.subscribers.values()))
            scorer = PrecisePrefixCacheScorer("p", index, Tokenizers({"*": {"kind": "sim"}}), events=mgr)
            target = fleet.endpoints[1]
            body = {"model": "sim-llama", "messages": MESSAGES, "max_tokens": 2}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://{target}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()

            def scores() -> list[float]:
                req = parse_request("/v1/chat/completions", json.dumps(body).encode())
                return list(scorer.score(CycleState(), req, pool.snapshot()))

            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while scores()[1] < 0.9:
                assert loop.time() < end, (scores(), mgr.stats(), index.snapshot_stats())
                await asyncio.sleep(0.02)
            s = scores()
            assert s[0] == 0.0 and s[1] >= 0.9
            assert index.block_size_of(target) == fleet.pod(target).profile.block_size
            assert mgr.stats()["batches"] >= 1 and mgr.stats()["decode_errors"] == 0
        finally:
            await mgr.stop()
