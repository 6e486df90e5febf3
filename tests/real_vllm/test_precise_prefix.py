"""(e) The precise-prefix scorer against real vLLM KV events: real Envoy + extproc (precise-prefix profile, the
tiny model's own tokenizer) + two real vLLM pods. After a request completes (its in-flight hold released), the
only thing that can tell the index where its blocks live is the pod's BlockStored events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from extproc.api import parse_request
from extproc.harness import Stack, StackSpec
from extproc.sim.calibrate import VllmServer
from extproc.sim.tiny_model import corpus

from .conftest import MODEL
from .helpers import metrics_text, post_json, sample_sum

pytestmark = pytest.mark.asyncio(loop_scope="session")
SERVED = "x-gateway-destination-endpoint-served"


async def test_precise_prefix_learns_from_real_kv_events(vllm_pods: list[VllmServer], tiny_model_dir: Path) -> None:
    kv = {p.address: {"endpoint": p.kv_endpoint, "replay_endpoint": p.kv_replay_endpoint, "topic": p.kv_topic} for p in vllm_pods}
    spec = StackSpec(
        endpoints=[p.address for p in vllm_pods],
        config="precise-prefix",
        models=[MODEL],
        kv_events=kv,
        in_process=True,
        scheduler_args=["--tokenizer", f"{MODEL}=hf:{tiny_model_dir}"],
    )
    text = " ".join(corpus(seed=4242, sentences=60))  # ~500 tokens: three full 128-token blocks
    body1 = {"model": MODEL, "prompt": text + " first question", "max_tokens": 2}
    body2 = {"model": MODEL, "prompt": text + " second question", "max_tokens": 2}
    async with Stack(spec) as st:
        server = st.server
        index = server.services["kv_index"]
        events = server.services["kv_events"]
        toks = server.services["tokenizers"]
        by_addr = {p.address: p for p in vllm_pods}
        async with aiohttp.ClientSession() as s:
            for _ in range(100):  # both pods scraped and subscribed
                if all(ep.metrics.updated_at for ep in server.pool.snapshot()) and events.stats()["subscribers"] == 2:
                    break
                await asyncio.sleep(0.1)
            status, h1, r1 = await post_json(s, st.url + "/v1/completions", body1)
            assert status == 200, r1
            pod1 = h1[SERVED]
            other = next(a for a in by_addr if a != pod1)
            req = parse_request("/v1/completions", json.dumps(body2).encode())
            ids = toks.tokenize(req)
            assert ids is not None and len(ids) >= 3 * 128  # the model's own tokenizer, loaded from the local dir
            keys = None
            for _ in range(100):  # wait until the pod's BlockStored events reached the index (holds are gone)
                bs = index.block_size_of(pod1)
                if bs and index.holds_of(pod1) == 0:
                    keys = index.keys_for(ids, bs)
                    if index.lookup(keys, [pod1, other]).get(pod1, 0) >= 3:
                        break
                await asyncio.sleep(0.1)
            assert keys is not None, "no KV events with a block size arrived from the real pod"
            assert index.block_size_of(pod1) == 128  # vLLM CPU's block size, learned from the events
            matched = index.lookup(keys, [pod1, other])
            assert matched.get(pod1, 0) >= 3 and matched.get(other, 0) == 0, matched
            assert events.stats()["decode_errors"] == 0
            hits_before = sample_sum(await metrics_text(s, by_addr[pod1].url), "vllm:prefix_cache_hits_total")
            status, h2, r2 = await post_json(s, st.url + "/v1/completions", body2)
            assert status == 200, r2
            assert h2[SERVED] == pod1  # the precise scorer sent the shared prefix back to the pod that holds it
            hits_after = sample_sum(await metrics_text(s, by_addr[pod1].url), "vllm:prefix_cache_hits_total")
            assert hits_after - hits_before >= 3 * 128
