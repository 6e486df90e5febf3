"""Background scraping of each pod's ``/metrics`` (vLLM 0.32 names) and ``/v1/models``.

One asyncio task per pod, so a slow or hung pod never delays the others (no head-of-line blocking). Each
scrape publishes a new immutable ``PodMetrics`` snapshot on the Endpoint.

Staleness is *not* saturation (the reference's false-saturation bug): a pod whose last good scrape is old keeps
its last values and its age is exported; only ``unhealthy_after`` consecutive failures mark it unhealthy (it is
then filtered), and the first successful scrape makes it healthy again.

Parsing uses prometheus_client's text parser, fed only the lines of the families we read (vLLM's /metrics is
mostly histogram buckets we do not need; pre-filtering by name prefix cuts the parse cost ~20×).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics

log = logging.getLogger(__name__)

# Every vLLM metric the scheduler reads (a real-vLLM test checks the simulator exposes all of them).
M_WAITING = "vllm:num_requests_waiting"
M_RUNNING = "vllm:num_requests_running"
M_KV = "vllm:kv_cache_usage_perc"
M_LORA = "vllm:lora_requests_info"
M_CACHE_CONFIG = "vllm:cache_config_info"
M_PREFIX_QUERIES = "vllm:prefix_cache_queries"  # counter family name (sample: ..._total)
M_PREFIX_HITS = "vllm:prefix_cache_hits"
METRIC_NAMES: tuple[str, ...] = (
    M_WAITING,
    M_RUNNING,
    M_KV,
    M_LORA,
    M_CACHE_CONFIG,
    M_PREFIX_QUERIES + "_total",
    M_PREFIX_HITS + "_total",
)
_PREFIXES: tuple[bytes, ...] = tuple(
    p.encode() for p in (M_WAITING + "{", M_WAITING + " ", M_RUNNING, M_KV, M_LORA, M_CACHE_CONFIG, M_PREFIX_QUERIES, M_PREFIX_HITS)
)


def _split_csv(v: str) -> frozenset[str]:
    return frozenset(s for s in (x.strip() for x in v.split(",")) if s)


def parse_metrics(text: bytes, now: float | None = None) -> PodMetrics:
    """Parse vLLM ``/metrics`` text into a PodMetrics snapshot. Raises ValueError on unparsable input."""
    keep: list[bytes] = []
    for line in text.splitlines():
        if line.startswith(b"#"):
            # keep TYPE lines of our families so the parser knows counters from gauges
            if line.startswith(b"# TYPE ") and line[7:].startswith(_PREFIXES):
                keep.append(line)
            continue
        if line.startswith(_PREFIXES):
            keep.append(line)
    waiting = running = 0.0
    kv = 0.0
    running_l: frozenset[str] = frozenset()
    waiting_l: frozenset[str] = frozenset()
    max_l = 0
    block_size = num_blocks = 0
    pq = ph = 0.0
    lora_ts = -1.0
    seen_any = False
    try:
        families = list(text_string_to_metric_families(b"\n".join(keep).decode("utf-8", "replace") + "\n"))
    except Exception as e:  # the library raises ValueError/TypeError/IndexError on junk
        raise ValueError(f"unparsable metrics: {e}") from None
    for fam in families:
        name = fam.name
        if name == M_WAITING:
            # one sample per engine / model_name; sum them (DP ranks)
            waiting = sum(s.value for s in fam.samples if s.name == M_WAITING)
            seen_any = True
        elif name == M_RUNNING:
            running = sum(s.value for s in fam.samples if s.name == M_RUNNING)
            seen_any = True
        elif name == M_KV:
            vals = [s.value for s in fam.samples if s.name == M_KV]
            kv = max(vals) if vals else 0.0
            seen_any = True
        elif name == M_LORA:
            # the sample with the latest timestamp value is current
            for s in fam.samples:
                if s.value >= lora_ts:
                    lora_ts = s.value
                    running_l = _split_csv(s.labels.get("running_lora_adapters", ""))
                    waiting_l = _split_csv(s.labels.get("waiting_lora_adapters", ""))
                    try:
                        max_l = int(float(s.labels.get("max_lora", "0") or 0))
                    except ValueError:
                        max_l = 0
        elif name == M_CACHE_CONFIG:
            for s in fam.samples:
                try:
                    block_size = int(float(s.labels.get("block_size", "0") or 0))
                    num_blocks = int(float(s.labels.get("num_gpu_blocks", "0") or 0))
                except ValueError:
                    pass
        elif name == M_PREFIX_QUERIES or name == M_PREFIX_QUERIES + "_total":
            pq = sum(s.value for s in fam.samples if s.name.endswith("_total"))
        elif name == M_PREFIX_HITS or name == M_PREFIX_HITS + "_total":
            ph = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    if not seen_any:
        raise ValueError("no vllm:num_requests_* / kv_cache_usage_perc samples found")
    return PodMetrics(
        waiting=int(waiting),
        running=int(running),
        kv_usage=min(max(kv, 0.0), 1.0),
        running_loras=running_l,
        waiting_loras=waiting_l,
        max_loras=max_l,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        prefix_cache_queries=pq,
        prefix_cache_hits=ph,
        updated_at=now if now is not None else time.monotonic(),
    )


@dataclass(slots=True)
class ScrapeSettings:
    interval_s: float = 0.05
    timeout_s: float = 1.0
    unhealthy_after: int = 5  # consecutive failures before a pod is filtered out
    models_interval_s: float = 5.0


ScrapeHook = Callable[[Endpoint, bool, float], None]  # (endpoint, ok, seconds) → metrics


class MetricsScraper:
    """Scrapes every endpoint of the pool concurrently, in the background."""

    def __init__(self, pool: EndpointPool, settings: ScrapeSettings | None = None, on_scrape: ScrapeHook | None = None) -> None:
        self.pool = pool
        self.settings = settings or ScrapeSettings()
        self.on_scrape = on_scrape
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        pool.add_listener(self._on_change)

    async def start(self, loops: bool = True) -> None:
        """Open the HTTP session and (unless ``loops=False``, for tests driving ``scrape_once``) start one
        scrape loop per endpoint."""
        if self._started:
            return
        self._started = loops
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
        )
        if loops:
            for ep in self.pool.snapshot():
                self._spawn(ep)

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One scrape of one pod (used by the loop and by tests)."""
        assert self._session is not None, "start() first"
        t0 = time.monotonic()
        ok = False
        try:
            async with self._session.get(f"http://{ep.address}/metrics") as r:
                if r.status != 200:
                    raise ValueError(f"/metrics answered {r.status}")
                body = await r.read()
            ep.metrics = parse_metrics(body)
            ok = True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as e:
            ep.scrape_failures += 1
            ep.last_error = f"{type(e).__name__}: {e}"[:200]
            if ep.healthy and ep.scrape_failures >= self.settings.unhealthy_after:
                ep.healthy = False
                log.warning("endpoint unhealthy", extra={"endpoint": ep.address, "failures": ep.scrape_failures, "error": ep.last_error})
        if ok:
            if not ep.healthy:
                log.info("endpoint recovered", extra={"endpoint": ep.address})
            ep.healthy = True
            ep.scrape_failures = 0
            ep.last_error = ""
        if self.on_scrape is not None:
            self.on_scrape(ep, ok, time.monotonic() - t0)
        return ok

    async def fetch_models(self, ep: Endpoint) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{ep.address}/v1/models") as r:
                if r.status != 200:
                    return False
                data = await r.json(content_type=None)
            ids = frozenset(m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str))
            if ids:
                ep.models = ids
            return True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError, KeyError, TypeError, AttributeError):
            return False

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            t = self._tasks.pop(ep.address, None)
            if t is not None:
                t.cancel()
        if self._started:
            for ep in added:
                self._spawn(ep)

    def _spawn(self, ep: Endpoint) -> None:
        if ep.address in self._tasks:
            return
        self._tasks[ep.address] = asyncio.get_running_loop().create_task(self._loop(ep), name=f"scrape:{ep.address}")

    async def _loop(self, ep: Endpoint) -> None:
        s = self.settings
        next_models = 0.0
        while not ep.removed:
            t0 = time.monotonic()
            if t0 >= next_models:
                if await self.fetch_models(ep):
                    next_models = t0 + s.models_interval_s
                else:
                    next_models = t0 + min(1.0, s.models_interval_s)
            await self.scrape_once(ep)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(max(s.interval_s - elapsed, s.interval_s * 0.2))
