"""llm-d samples through the real server: `extproc serve --config <llm-d sample>` becomes ready behind real Envoy,
and the sample's decode-filter routes by the role labels given in the endpoints file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from extproc.harness import Stack, StackSpec

pytestmark = pytest.mark.envoy
MODEL = "sim-llama"
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "llmd-configs"


async def test_llmd_sample_serves_and_decode_filter_follows_labels(fleet):
    eps = fleet.endpoints
    labels = {eps[0]: {"llm-d.ai/role": "prefill"}, eps[1]: {"llm-d.ai/role": "prefill"}}  # eps[2] unlabelled
    spec = StackSpec(endpoints=eps, config=str(SAMPLES / "deploy" / "epp-config.yaml"), models=[MODEL], labels=labels)
    async with Stack(spec) as st, aiohttp.ClientSession() as s:

        async def one(i: int) -> tuple[int, str]:
            body = {"model": MODEL, "prompt": f"request {i} " * 10, "max_tokens": 3}
            async with s.post(st.url + "/v1/completions", json=body) as r:
                await r.read()
                return r.status, r.headers.get("x-inference-pod", "")

        results = await asyncio.gather(*(one(i) for i in range(12)))
    assert all(status == 200 for status, _ in results), results
    # decode-filter keeps decode-role and unlabelled pods: the two prefill pods never serve
    assert {pod for _, pod in results} == {eps[2]}
