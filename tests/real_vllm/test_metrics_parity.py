"""(c) The simulator exposes every vLLM metric the scheduler reads, and the real server has each of them."""

from __future__ import annotations

import aiohttp
import pytest

from extproc.datalayer.scrape import M_LORA, METRIC_NAMES, parse_metrics
from extproc.sim.calibrate import VllmServer, server_facts
from extproc.sim.fleet import FleetSpec, SimFleet

from .conftest import MODEL
from .helpers import family_names, metrics_text, post_json

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _touch(s: aiohttp.ClientSession, url: str) -> None:
    status, _, body = await post_json(s, url + "/v1/completions", {"model": MODEL, "prompt": "warm the cache", "max_tokens": 2})
    assert status == 200, body


async def test_sim_metric_names_cover_scheduler_and_exist_on_real_vllm(vllm_pods: list[VllmServer]) -> None:
    plain, lora = vllm_pods
    async with SimFleet(FleetSpec(pods=1, profile="tiny-cpu", model=MODEL, loras=("adapter-a",))) as fleet:
        sim_url = "http://" + fleet.endpoints[0]
        async with aiohttp.ClientSession() as s:
            for url in (sim_url, plain.url, lora.url):
                await _touch(s, url)
            sim_names = family_names(await metrics_text(s, sim_url))
            plain_names = family_names(await metrics_text(s, plain.url))
            lora_names = family_names(await metrics_text(s, lora.url))
    wanted = set(METRIC_NAMES)
    assert wanted - sim_names == set(), "simulator lacks metrics the scheduler reads"
    # every name the scheduler reads exists on real vLLM 0.32 (LoRA info only where LoRA is enabled)
    assert wanted - {M_LORA} - plain_names == set()
    assert wanted - lora_names == set()
    assert M_LORA not in plain_names
    # the simulator invents no vllm:* names the real server does not have
    real = plain_names | lora_names
    invented = {n for n in sim_names if n.startswith("vllm:") and n not in real and not n.endswith("_created")}
    assert invented == set()


async def test_scraper_parses_real_vllm_metrics(vllm_pods: list[VllmServer]) -> None:
    async with aiohttp.ClientSession() as s:
        for i, pod in enumerate(vllm_pods):
            text = await metrics_text(s, pod.url)
            m = parse_metrics(text.encode())
            assert m.waiting == 0 and m.running == 0
            assert 0.0 <= m.kv_usage <= 1.0
            assert (m.block_size, m.num_gpu_blocks) == (128, 8192)
            assert m.prefix_cache_queries >= m.prefix_cache_hits >= 0
            assert m.max_loras == (1 if i == 1 else 0)  # only the LoRA-enabled pod reports lora_requests_info
            facts = await server_facts(pod.url, MODEL)
            assert facts.block_size == 128  # vLLM CPU default
            assert facts.num_gpu_blocks == 8192  # 1 GiB / (2 layers x 4 heads x 32 x 2 x 2 B) / 128
            assert facts.max_model_len == 2048
