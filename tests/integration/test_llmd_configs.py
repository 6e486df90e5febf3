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


async def test_llmd_precise_sample_with_one_shared_zmq_endpoint() -> None:
    """llm-d's precise-prefix deployment: vLLM pods publish their KV events to ONE endpoint the scheduler binds
    (``kvEventsConfig.zmqEndpoint``; topic ``kv@<pod>@<model>``). Through real Envoy with the unchanged sample: the
    scheduler hears every pod on that endpoint and repeated prompts stay on the pod that cached them."""
    from extproc.contract import SERVED_HEADER
    from extproc.netutil import free_port
    from extproc.sim.fleet import FleetSpec, SimFleet

    bind = f"tcp://127.0.0.1:{free_port()}"  # the sample says tcp://0.0.0.0:5557; tests take a free port
    spec_f = FleetSpec(pods=3, model=MODEL, time_scale=0.05, seed=3, kv_events=True, kv_events_connect=bind)
    async with SimFleet(spec_f) as fleet:
        spec = StackSpec(endpoints=fleet.endpoints, models=[MODEL], config=str(SAMPLES / "deploy" / "sim-epp-kvcache-config.yaml"),
                         scheduler_args=["--tokenizer", f"{MODEL}=sim", "--kv-events-bind", bind], scrape_interval_s=0.05)  # fmt: skip
        async with Stack(spec) as st, aiohttp.ClientSession() as s:
            assert st.metrics_url is not None

            async def gauges() -> dict[str, float]:
                async with s.get(st.metrics_url + "/metrics") as r:
                    text = await r.text()
                out = {}
                for line in text.splitlines():
                    if line.startswith("extproc_kv_events_"):
                        k, _, v = line.partition(" ")
                        out[k] = float(v)
                return out

            async def post(url: str, prompt: str) -> str:
                async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
                    await r.read()
                    assert r.status == 200
                    return r.headers.get(SERVED_HEADER, "")

            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            rounds = 0
            # ZMQ connects asynchronously and a PUB drops what it sends before the SUB's subscription reaches it (the
            # slow joiner), so each round sends a NEW prompt: a repeated one hits the pod's cache and publishes nothing
            while (await gauges()).get("extproc_kv_events_subscribers", 0) < 3:
                assert loop.time() < end, (rounds, await gauges())
                rounds += 1
                for i, pod in enumerate(fleet.endpoints):
                    await post(f"http://{pod}", f"warm-up {i} round {rounds} " * 30)
                await asyncio.sleep(0.1)
            prompt = "a long shared system prompt about the cache-aware routing of this gateway " * 12
            first = await post(st.url, prompt)
            assert first in fleet.endpoints
            served = [await post(st.url, prompt + f" question {i}") for i in range(5)]
            g = await gauges()
    assert served == [first] * 5, (first, served)
    # every pod was heard on the one endpoint (a warm-up from each and the first prompt at least)
    assert g["extproc_kv_events_subscribers"] == 3 and g["extproc_kv_events_batches"] >= 4
    assert g["extproc_kv_events_shared_unknown_pods"] == 0 and g["extproc_kv_events_decode_errors"] == 0
