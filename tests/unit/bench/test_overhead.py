"""Fake pods (Envoy direct_response) and the overhead benchmark's pieces: scraping, routing, wrk plumbing.

Nothing here asserts speed: only that the fixture answers like a vLLM pod, that ``extproc serve`` scrapes it and
routes through it, and that the wrk summary and the result tables are read correctly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import aiohttp
import pytest

from extproc.bench import overhead
from extproc.bench.fakepods import FakePods, bootstrap, metrics_text, pod_metrics
from extproc.datalayer.scrape import METRIC_NAMES, parse_metrics
from extproc.envoy_config import find_envoy_binary

pytestmark = pytest.mark.timeout(60)


def _have_envoy() -> bool:
    try:
        find_envoy_binary()
    except Exception:
        return False
    return True


needs_envoy = pytest.mark.skipif(not _have_envoy(), reason="envoy binary not installed")


# ------------------------------------------------------------------------------------------------ pure pieces


def test_metrics_text_has_every_scraped_family_and_parses_to_the_pod_values() -> None:
    for i in range(8):
        m = pod_metrics(i)
        text = metrics_text("sim-llama", m)
        for name in METRIC_NAMES:
            assert name in text
        pm = parse_metrics(text.encode())
        assert (pm.waiting, pm.running, pm.kv_usage) == (m.waiting, m.running, m.kv_usage)
        assert (pm.block_size, pm.num_gpu_blocks, pm.max_loras) == (m.block_size, m.num_gpu_blocks, m.max_lora)
        assert (pm.prefix_cache_queries, pm.prefix_cache_hits) == (m.prefix_queries, m.prefix_hits)


def test_pod_metrics_vary_across_pods() -> None:
    loads = {(pod_metrics(i).waiting, pod_metrics(i).running, pod_metrics(i).kv_usage) for i in range(8)}
    assert len(loads) == 8


def test_bootstrap_one_listener_per_port_with_pod_header() -> None:
    b = bootstrap([41001, 41002], ["m1", "m2"])
    listeners = b["static_resources"]["listeners"]
    assert [ln["address"]["socket_address"]["port_value"] for ln in listeners] == [41001, 41002]
    vh = listeners[1]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    assert vh["response_headers_to_add"][0]["header"] == {"key": "x-inference-pod", "value": "127.0.0.1:41002"}
    with pytest.raises(ValueError):
        bootstrap([41001], [])


def test_wrk_script_embeds_body_and_prints_summary_line() -> None:
    body = b'{"model":"m","prompt":"a ]====] b"}'
    lua = overhead.wrk_script(body)
    assert 'wrk.method = "POST"' in lua
    assert body.decode() in lua
    # the long-bracket level is chosen so the body cannot close it
    assert "[=====[" in lua and "]=====]" in lua
    assert "WRKJSON" in lua and "latency:percentile(99)" in lua


def test_parse_wrk_output_counts_non_2xx_as_errors() -> None:
    line = {"requests": 1000, "duration_us": 2_000_000, "connect": 0, "read": 1, "write": 0, "status": 10, "timeout": 2,
            "p50_us": 450, "p90_us": 700, "p99_us": 1500, "max_us": 9000}  # fmt: skip
    out = "Running 2s test\n  1 threads and 16 connections\nWRKJSON " + json.dumps(line) + "\n"
    r = overhead.parse_wrk_output(out)
    assert r == {"requests": 990, "errors": 13, "rps": 495.0, "p50_ms": 0.45, "p99_ms": 1.5}
    with pytest.raises(RuntimeError):
        overhead.parse_wrk_output("wrk: connection refused\n")


def test_resolve_client_falls_back_with_a_note_when_wrk_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_WRK", raising=False)
    monkeypatch.setattr(overhead.shutil, "which", lambda name: None)
    client, note = overhead.resolve_client("auto")
    assert client == "aiohttp" and note is not None and "wrk is not installed" in note
    assert overhead.resolve_client("wrk")[0] == "aiohttp"
    assert overhead.resolve_client("aiohttp") == ("aiohttp", None)
    monkeypatch.setattr(overhead.shutil, "which", lambda name: "/usr/bin/wrk")
    assert overhead.resolve_client("auto") == ("wrk", None)


def test_summarize_medians_and_ratios() -> None:
    rows: list[dict[str, Any]] = []
    for rnd, (e_rps, x_rps) in enumerate([(1000.0, 400.0), (1200.0, 600.0), (1100.0, 500.0)]):
        rows.append({"setup": "envoy-rr", "connections": 1, "round": rnd, "rps": e_rps, "p50_ms": 0.5, "p99_ms": 1.0,
                     "envoy_us": 100.0, "requests": 10, "errors": 0})  # fmt: skip
        rows.append({"setup": "extproc-none", "connections": 1, "round": rnd, "rps": x_rps, "p50_ms": 1.5, "p99_ms": 3.0,
                     "sched_us": 500.0 + rnd, "envoy_us": 200.0, "requests": 10, "errors": 1})  # fmt: skip
    table, ratios = overhead.summarize(rows, ["none"], [1])
    e = next(t for t in table if t["setup"] == "envoy-rr")
    x = next(t for t in table if t["setup"] == "extproc-none")
    assert (e["rps"], e["rps_min"], e["rps_max"], e["sched_us"]) == (1100.0, 1000.0, 1200.0, None)
    assert (x["rps"], x["sched_us"], x["errors"], x["rounds"]) == (500.0, 501.0, 3, 3)
    assert ratios == [{"setup": "extproc-none", "connections": 1, "rps_ratio": 0.455, "added_p50_ms": 1.0, "added_p99_ms": 2.0}]


# ------------------------------------------------------------------------------------------------ with Envoy


@needs_envoy
async def test_fake_pods_answer_like_vllm() -> None:
    async with FakePods(2, models=["sim-llama"]) as pods:
        assert len(pods.endpoints) == 2
        async with aiohttp.ClientSession() as s:
            for i, ep in enumerate(pods.endpoints):
                async with s.post(f"http://{ep}/v1/completions", json={"model": "sim-llama", "prompt": "hi"}) as r:
                    assert r.status == 200
                    assert r.headers["x-inference-pod"] == ep
                    assert r.headers["content-type"].startswith("application/json")
                    data = await r.json()
                    assert data["usage"]["completion_tokens"] == 1 and data["choices"][0]["text"]
                async with s.get(f"http://{ep}/metrics") as r:
                    assert r.status == 200
                    pm = parse_metrics(await r.read())
                    assert (pm.waiting, pm.running) == (pod_metrics(i).waiting, pod_metrics(i).running)
                async with s.get(f"http://{ep}/v1/models") as r:
                    assert [m["id"] for m in (await r.json())["data"]] == ["sim-llama"]
                async with s.get(f"http://{ep}/health") as r:
                    assert r.status == 200
                async with s.get(f"http://{ep}/nope") as r:
                    assert r.status == 404
    assert pods.envoy is None


async def _wait_scraped(metrics_url: str, endpoints: list[str], timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """Poll the scheduler's /debug/endpoints until every pod shows its fake metrics and model."""
    want = {ep: pod_metrics(i) for i, ep in enumerate(endpoints)}
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        while asyncio.get_running_loop().time() < deadline:
            async with s.get(f"{metrics_url}/debug/endpoints") as r:
                data = await r.json()
            last = data["endpoints"] if isinstance(data, dict) else data
            ok = len(last) == len(endpoints) and all(
                e["healthy"]
                and "sim-llama" in e["models"]
                and (e["waiting"], e["running"], e["kv_usage"]) == (want[e["address"]].waiting, want[e["address"]].running, want[e["address"]].kv_usage)
                for e in last
            )
            if ok:
                return last
            await asyncio.sleep(0.05)
    raise AssertionError(f"scheduler never showed the fake pods' metrics: {last}")


@needs_envoy
@pytest.mark.parametrize("observe", ["observability", "none"])
async def test_extproc_serve_scrapes_fake_pods_and_routes_through_them(observe: str) -> None:
    from extproc.harness import Stack, StackSpec

    async with FakePods(3, models=["sim-llama"]) as pods:
        spec = StackSpec(endpoints=pods.endpoints, config="default", response_observe=observe)
        async with Stack(spec) as st:
            assert st.metrics_url is not None
            await _wait_scraped(st.metrics_url, pods.endpoints)
            served: set[str] = set()
            async with aiohttp.ClientSession() as s:
                for k in range(6):
                    body = {"model": "sim-llama", "prompt": f"route probe {k}", "max_tokens": 1}
                    async with s.post(f"{st.url}/v1/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        pick = r.headers["x-gateway-destination-endpoint-served"]
                        assert r.headers["x-inference-pod"] == pick
                        assert pick in pods.endpoints
                        assert (await r.json())["usage"]["total_tokens"] == 9
                        served.add(pick)
            assert served


@needs_envoy
async def test_wrk_run_against_fake_pods_reports_requests() -> None:
    if shutil.which("wrk") is None:
        # `make test` installs it (scripts/system_deps.sh); under CI a missing prerequisite is a failure
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed (Debian package `wrk`; make test runs scripts/system_deps.sh)")
        pytest.skip("wrk not installed (apt-get install -y wrk)")
    async with FakePods(1) as pods:
        r = await overhead.run_wrk(f"http://{pods.endpoints[0]}", 2, 1.0)
    assert r["requests"] > 0 and r["errors"] == 0
    assert r["p50_ms"] is not None and r["p99_ms"] is not None and r["p99_ms"] >= r["p50_ms"]


@needs_envoy
async def test_fake_pods_512_start_on_kernel_chosen_ports() -> None:
    """512 listeners in one Envoy, every port chosen by the kernel (free-port guessing collided at 256)."""
    async with FakePods(512, models=["sim-llama"]) as pods:
        assert len(pods.endpoints) == 512 and len(set(pods.endpoints)) == 512
        async with aiohttp.ClientSession() as s:
            for ep in (pods.endpoints[0], pods.endpoints[255], pods.endpoints[511]):
                async with s.get(f"http://{ep}/metrics") as r:
                    assert r.status == 200 and r.headers["x-inference-pod"] == ep


def test_pods_list_parses_and_options_keep_every_count() -> None:
    import argparse

    assert overhead.parse_pods("8,64,512") == [8, 64, 512] and overhead.parse_pods(8) == [8]
    p = argparse.ArgumentParser()
    overhead.add_arguments(p)
    opts = overhead.options_from_args(p.parse_args(["--pods", "8,64", "--variants", "observability-grpcio"]))
    assert opts.pods == [8, 64] and opts.variants == ["observability-grpcio"]
    assert overhead._setup_names(opts.observe, opts.variants)[-1] == "extproc-observability-grpcio"
