import asyncio
import time

import pytest
from aiohttp import web

from extproc.admission.saturation import SaturationDetector
from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.datalayer.scrape import METRIC_NAMES, MetricsScraper, ScrapeSettings, parse_metrics

VLLM_TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.6e9
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="4096"} 1.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{model_name="m"} 3.0
"""


def test_parse_vllm_names():
    m = parse_metrics(VLLM_TEXT, now=5.0)
    assert (m.running, m.waiting, m.kv_usage) == (3, 7, 0.42)
    assert m.running_loras == {"a", "b"} and m.waiting_loras == {"c"} and m.max_loras == 2  # latest timestamp wins
    assert (m.block_size, m.num_gpu_blocks) == (16, 4096)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000.0, 250.0)
    assert m.updated_at == 5.0
    assert "vllm:kv_cache_usage_perc" in METRIC_NAMES


@pytest.mark.parametrize("junk", [b"", b"hello world", b"# TYPE x gauge\nx 1\n", b"\xff\xfe"])
def test_parse_rejects_junk(junk):
    with pytest.raises(ValueError):
        parse_metrics(junk)


async def test_unhealthy_after_failures_and_recovery():
    state = {"fail": False}

    async def metrics(request):
        if state["fail"]:
            return web.Response(status=500, text="boom")
        return web.Response(body=VLLM_TEXT, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    pool = EndpointPool()
    pool.set_endpoints([addr])
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=3600, unhealthy_after=3))
    await scraper.start(loops=False)
    try:
        ep = pool.get(addr)
        assert await scraper.scrape_once(ep) and ep.healthy and ep.metrics.waiting == 7
        state["fail"] = True
        for i in range(2):
            assert not await scraper.scrape_once(ep)
            assert ep.healthy  # a couple of failures: stale, still routable
        assert not await scraper.scrape_once(ep)
        assert not ep.healthy and "500" in ep.last_error
        assert ep.metrics.waiting == 7  # last good values kept
        state["fail"] = False
        assert await scraper.scrape_once(ep)
        assert ep.healthy and ep.scrape_failures == 0
    finally:
        await scraper.stop()
        await runner.cleanup()


async def test_slow_pod_does_not_block_others():
    slow_started = asyncio.Event()

    async def slow(request):
        slow_started.set()
        await asyncio.sleep(5)
        return web.Response(body=VLLM_TEXT)

    async def fast(request):
        return web.Response(body=VLLM_TEXT)

    runners, addrs = [], []
    for h in (slow, fast):
        app = web.Application()
        app.router.add_get("/metrics", h)
        r = web.AppRunner(app)
        await r.setup()
        s = web.TCPSite(r, "127.0.0.1", 0)
        await s.start()
        runners.append(r)
        addrs.append(f"127.0.0.1:{s._server.sockets[0].getsockname()[1]}")
    pool = EndpointPool()
    pool.set_endpoints(addrs)
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=0.02, timeout_s=10))
    await scraper.start()
    try:
        await slow_started.wait()
        await asyncio.sleep(0.3)
        fast_ep = pool.get(addrs[1])
        assert fast_ep.metrics_age() < 0.2  # fast pod kept being scraped while the slow one hung
    finally:
        await scraper.stop()
        for r in runners:
            await r.cleanup()


def test_stale_is_not_saturated():
    pool = EndpointPool()
    pool.set_endpoints(["a:1", "b:2"])
    det = SaturationDetector(queue_depth_threshold=5, kv_cache_util_threshold=0.8, metrics_staleness_s=2.0)
    now = time.monotonic()
    for ep in pool.snapshot():
        ep.metrics = PodMetrics(waiting=50, kv_usage=0.99, updated_at=now - 10)  # stale and "full"
    assert not det.saturated(pool.snapshot(), now)
    for ep in pool.snapshot():
        ep.metrics = PodMetrics(waiting=50, kv_usage=0.99, updated_at=now)
    assert det.saturated(pool.snapshot(), now)
    pool.get("a:1").metrics = PodMetrics(waiting=0, kv_usage=0.1, updated_at=now)
    assert not det.saturated(pool.snapshot(), now)
    det.max_inflight_per_pod = 2
    pool.get("a:1").inflight = 2
    assert det.saturated(pool.snapshot(), now)  # own accounting counts even when metrics look fine
