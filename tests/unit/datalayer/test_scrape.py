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


# ------------------------------------------------------------------------------------------------ fast parser vs oracle


def _oracle(text: bytes) -> tuple:
    """prometheus_client's full text parser (what parse_metrics used before): the reference for the fast parser."""
    from prometheus_client.parser import text_string_to_metric_families

    got: dict[str, list] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for smp in fam.samples:
            got.setdefault(smp.name, []).append(smp)
    def s(name: str) -> float:
        return sum(x.value for x in got.get(name, []))
    lora = max(got.get("vllm:lora_requests_info", []), key=lambda x: x.value, default=None)
    cache = (got.get("vllm:cache_config_info") or [None])[-1]
    return (
        int(s("vllm:num_requests_waiting")),
        int(s("vllm:num_requests_running")),
        max((x.value for x in got.get("vllm:kv_cache_usage_perc", [])), default=0.0),
        frozenset(a for a in (lora.labels.get("running_lora_adapters", "") if lora else "").split(",") if a),
        int(float(cache.labels["block_size"])) if cache else 0,
        int(float(cache.labels["num_gpu_blocks"])) if cache else 0,
        s("vllm:prefix_cache_queries_total"),
        s("vllm:prefix_cache_hits_total"),
    )


def _fast(text: bytes) -> tuple:
    m = parse_metrics(text)
    return (m.waiting, m.running, m.kv_usage, m.running_loras, m.block_size, m.num_gpu_blocks, m.prefix_cache_queries, m.prefix_cache_hits)


def test_fast_parser_matches_prometheus_client_on_the_simulator_exposition() -> None:
    from extproc.bench.fakepods import metrics_text, pod_metrics

    texts = [VLLM_TEXT] + [metrics_text("m", pod_metrics(i)).encode() for i in range(5)]
    # a multi-engine (DP ranks) exposition, names sharing prefixes, histogram noise, timestamps
    texts.append(
        b'vllm:num_requests_waiting_by_reason{reason="y"} 5.0\n'
        b"# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        b'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0 1700000000000\n'
        b'vllm:num_requests_waiting_by_reason{reason="x"} 99.0\n'
        b'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'
        b'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
        b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        b'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5\n'
        b'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 7.0\n'
        b'vllm:prefix_cache_queries_total{engine="0"} 10.0\n'
        b'vllm:prefix_cache_queries_created{engine="0"} 1.7e9\n'
        b'vllm:prefix_cache_queries_total{engine="1"} 5.0\n'
        b'vllm:prefix_cache_queries_created{engine="1"} 1.7e9\n'
    )
    for t in texts:
        assert _fast(t) == _oracle(t), t[:200]




async def test_adaptive_intervals_back_off_when_idle_and_return_on_dispatch() -> None:
    times: list[float] = []
    state = {"change": False}

    async def metrics(request):
        times.append(time.monotonic())
        body = VLLM_TEXT.replace(b"} 7.0", b"} %d.0" % len(times)) if state["change"] else VLLM_TEXT
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    pool = EndpointPool()
    pool.set_endpoints([addr])
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=0.01, idle_interval_s=0.08, timeout_s=2))
    await scraper.start()
    try:
        await asyncio.sleep(2.0)
        # unchanged and idle: gaps 10, 20, 40, 80, 80, 80 ms ... → far fewer than 2 s / 10 ms = 200; without the
        # ceiling they would double on (160, 320, 640, 1280 ms: ~11 scrapes in 2 s)
        idle = len(times)
        assert 12 <= idle <= 60, idle
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[0] < 0.05, gaps  # backing off starts from the base interval
        # never stale beyond the idle ceiling: the typical late gap is the ceiling (a median, so one stalled event
        # loop on a loaded 2-core CI machine — a full-suite gen-2 GC — does not decide the test)
        late = sorted(gaps[-7:])
        assert 0.06 <= late[len(late) // 2] < 0.16, gaps
        times.clear()
        scraper.touch(pool.get(addr))  # traffic after an idle spell: scraped again within the base interval
        await asyncio.sleep(0.15)
        assert len(times) >= 1, times
        # values changing at every scrape (a busy pod): the base rate
        state["change"] = True
        await asyncio.sleep(0.05)
        times.clear()
        await asyncio.sleep(0.8)
        assert len(times) >= 15, len(times)
    finally:
        await scraper.stop()
        await runner.cleanup()


async def test_budget_caps_scrapes_per_second() -> None:
    async def metrics(request):
        return web.Response(body=VLLM_TEXT, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    pool = EndpointPool()
    # 20 "pods" (the same server under different host spellings is not possible; use distinct ports via one address list)
    pool.set_endpoints([f"127.0.0.1:{port}"] + [f"localhost:{port}"])
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=0.001, adaptive=False, max_scrapes_per_s=50, timeout_s=2))
    await scraper.start()
    try:
        await asyncio.sleep(1.0)
        assert 20 <= scraper.scrapes <= 80, scraper.scrapes  # ~50/s, not 2 x 1000/s
    finally:
        await scraper.stop()
        await runner.cleanup()


async def test_failing_pods_back_off_and_inflight_is_capped() -> None:
    """A pod that hangs is not re-tried every interval (no connection storm), and at most max_inflight scrapes
    are open at once however many pods hang."""
    started = {"n": 0}
    release = asyncio.Event()

    async def hang(request):
        started["n"] += 1
        await release.wait()
        return web.Response(body=VLLM_TEXT)

    app = web.Application()
    app.router.add_get("/metrics", hang)
    app.router.add_get("/v1/models", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    pool = EndpointPool()
    pool.set_endpoints([f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"][:2])
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=0.01, timeout_s=0.1, idle_interval_s=0.8, max_inflight=1))
    await scraper.start()
    try:
        await asyncio.sleep(1.5)
        # without back-off: 2 pods x ~1.5 s / (0.1 s timeout + 0.01 s) ≈ 27 attempts; with it and one slot, far fewer
        assert 3 <= scraper.scrapes <= 16, scraper.scrapes
        assert len(scraper._inflight) <= 1
        assert all(not ep.healthy or ep.scrape_failures > 0 for ep in pool.snapshot())
    finally:
        release.set()
        await scraper.stop()
        await runner.cleanup()


async def test_stop_is_not_lost_when_a_scrape_finishes_at_the_same_moment() -> None:
    """A cancel arriving in the loop iteration that wakes the scheduler loop (a scrape finishing sets its event)
    must still stop it: asyncio.wait_for on Python 3.11 swallows exactly that cancel, and stop() then waited
    forever (a 600 s CI timeout)."""
    pool = EndpointPool()
    scraper = MetricsScraper(pool, ScrapeSettings(interval_s=0.01))
    await scraper.start()
    await asyncio.sleep(0.05)  # the loop is parked waiting on its wake event (no pods)
    task = scraper._task
    assert task is not None and scraper._wake is not None
    scraper._wake.set()  # what a finishing scrape does ...
    task.cancel()  # ... in the same iteration as stop()'s cancel
    done, _ = await asyncio.wait({task}, timeout=2.0)
    assert task in done, "the scrape loop swallowed its cancellation"
    await scraper.stop()
