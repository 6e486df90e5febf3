"""Background scraping of each pod's ``/metrics`` (vLLM 0.32 names) and ``/v1/models``.

Cost is what matters at hundreds of pods (docs/design.md "Data layer"; measured in docs/benchmarks.md):

- **Parse only what we read.** ``parse_metrics`` finds each of the seven families we use with ``bytes.find``
  (C speed) and parses just their sample lines; the rest of vLLM's exposition (mostly histogram buckets) is never
  split into lines. It replaced ``prometheus_client``'s text parser (kept as the oracle in the tests).
- **A raw keep-alive HTTP/1.1 client.** One connection per pod (an ``asyncio.Protocol``), a pre-built request,
  ``Content-Length`` and chunked bodies; about a tenth of aiohttp's per-request CPU.
- **Adaptive intervals.** A pod is scraped every ``interval_s`` while its values change (a busy vLLM pod's
  running/waiting/KV gauges change at every scrape) or its scrapes fail; a pod whose values did not change is
  scraped ever less often (doubling) up to ``idle_interval_s``, which stays below the saturation detector's
  staleness bound, so it never looks stale. Between scrapes the in-flight counters (``Endpoint.inflight`` and
  the token counters, updated on every dispatch and completion) carry the load signal, and a pod that gets a
  request from us after an idle spell (``touch``) is scraped within ``interval_s``.
- **A budget.** At most ``max_scrapes_per_s`` scrapes start per second across the pool; when more are due, the
  most overdue go first. This caps the data layer's CPU however large the pool is.

One scheduler task wakes at the next due time and starts each due scrape as its own task, so a slow or hung pod
never delays the others (no head-of-line blocking). Each scrape publishes a new immutable ``PodMetrics`` snapshot
on the Endpoint (one attribute store: scorers read without locks).

Staleness is *not* saturation (the reference's false-saturation bug): a pod whose last good scrape is old keeps
its last values and its age is exported; only ``unhealthy_after`` consecutive failures mark it unhealthy (it is
then filtered), and the first successful scrape makes it healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from extproc.contract import DEFAULT_SCRAPE_INTERVAL_S
from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics
from extproc.services import ServiceKey

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
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def _split_csv(v: str) -> frozenset[str]:
    return frozenset(s for s in (x.strip() for x in v.split(",")) if s)


def _samples(text: bytes, name: bytes, family: bytes | None = None) -> list[tuple[str, float]]:
    """Every sample line of metric ``name`` (exact name: ``name{...} v`` or ``name v``) → (label text, value).

    The family's group is found with ``bytes.find`` on ``\\n`` + name, so the rest of the exposition is never
    split into lines. ``family`` is the family's name when ``name`` is one of its samples (``..._total``)."""
    family = family or name
    out: list[tuple[str, float]] = []
    n = len(name)
    needle = b"\n" + name
    if text.startswith(name):
        start = 0
    else:
        i = text.find(needle)
        start = -1 if i == -1 else i + 1
    while start != -1:
        after = start + n
        c = text[after : after + 1]
        eol = text.find(b"\n", after)
        if eol == -1:
            eol = len(text)
        if c in (b"{", b" ", b"\t"):  # exactly this name (not a longer one sharing the prefix)
            line = text[after:eol].decode("utf-8", "replace")
            labels = ""
            rest = line
            if line.startswith("{"):
                close = line.rfind("}")
                if close == -1:
                    raise ValueError(f"unterminated label set in {name.decode()}")
                labels, rest = line[1:close], line[close + 1 :]
            parts = rest.split()
            if not parts:
                raise ValueError(f"sample of {name.decode()} has no value")
            try:
                value = float(parts[0])
            except ValueError:
                raise ValueError(f"bad value {parts[0]!r} for {name.decode()}") from None
            out.append((labels, value))
        # The text format keeps all lines of a family together (a counter's _total and _created lines interleave
        # per label set): walk on line by line while lines still start with the family name, then stop. One
        # search per family instead of a scan of the whole exposition.
        if text.startswith(family, eol + 1):
            start = eol + 1
        elif out:
            start = -1
        else:  # that group was another family sharing our prefix (..._by_reason): search on
            i = text.find(needle, eol)
            start = -1 if i == -1 else i + 1
    return out


def _labels(text: str) -> dict[str, str]:
    return {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") for k, v in _LABEL_RE.findall(text)}


def _int_label(labels: dict[str, str], key: str) -> int:
    v = labels.get(key, "0") or "0"
    try:
        f = float(v)
    except ValueError:
        return 0
    return int(f) if math.isfinite(f) else 0


_B_WAITING, _B_RUNNING, _B_KV = M_WAITING.encode(), M_RUNNING.encode(), M_KV.encode()
_B_LORA, _B_CACHE = M_LORA.encode(), M_CACHE_CONFIG.encode()
_B_PQ, _B_PH = (M_PREFIX_QUERIES + "_total").encode(), (M_PREFIX_HITS + "_total").encode()
_F_PQ, _F_PH = M_PREFIX_QUERIES.encode(), M_PREFIX_HITS.encode()


def parse_metrics(text: bytes, now: float | None = None) -> PodMetrics:
    """Parse vLLM ``/metrics`` text into a PodMetrics snapshot. Raises ValueError on unparsable input.

    Only the families in :data:`METRIC_NAMES` are looked at: gauges are summed over engines / DP ranks (KV usage:
    the max), LoRA info takes the sample with the latest timestamp value, counters sum their ``_total`` samples."""
    if isinstance(text, str):
        text = text.encode()
    waiting_s = _samples(text, _B_WAITING)
    running_s = _samples(text, _B_RUNNING)
    kv_s = _samples(text, _B_KV)
    if not (waiting_s or running_s or kv_s):
        raise ValueError("no vllm:num_requests_* / kv_cache_usage_perc samples found")
    running_l: frozenset[str] = frozenset()
    waiting_l: frozenset[str] = frozenset()
    max_l = 0
    lora_ts = -math.inf
    for lbl, v in _samples(text, _B_LORA):
        if v >= lora_ts:
            lora_ts = v
            d = _labels(lbl)
            running_l = _split_csv(d.get("running_lora_adapters", ""))
            waiting_l = _split_csv(d.get("waiting_lora_adapters", ""))
            max_l = _int_label(d, "max_lora")
    block_size = num_blocks = 0
    for lbl, _v in _samples(text, _B_CACHE):
        d = _labels(lbl)
        block_size, num_blocks = _int_label(d, "block_size"), _int_label(d, "num_gpu_blocks")
    kv = max((v for _, v in kv_s), default=0.0)
    if not math.isfinite(kv):
        kv = 0.0
    return PodMetrics(
        waiting=int(_finite_sum(waiting_s)),
        running=int(_finite_sum(running_s)),
        kv_usage=min(max(kv, 0.0), 1.0),
        running_loras=running_l,
        waiting_loras=waiting_l,
        max_loras=max_l,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        prefix_cache_queries=_finite_sum(_samples(text, _B_PQ, _F_PQ)),
        prefix_cache_hits=_finite_sum(_samples(text, _B_PH, _F_PH)),
        updated_at=now if now is not None else time.monotonic(),
    )


def _finite_sum(samples: list[tuple[str, float]]) -> float:
    return sum(v for _, v in samples if math.isfinite(v))


def same_values(a: PodMetrics, b: PodMetrics) -> bool:
    """Everything but the timestamp is equal (what adaptive scraping calls "unchanged")."""
    return (
        a.waiting == b.waiting
        and a.running == b.running
        and a.kv_usage == b.kv_usage
        and a.prefix_cache_queries == b.prefix_cache_queries
        and a.prefix_cache_hits == b.prefix_cache_hits
        and a.running_loras == b.running_loras
        and a.waiting_loras == b.waiting_loras
        and a.max_loras == b.max_loras
        and a.block_size == b.block_size
        and a.num_gpu_blocks == b.num_gpu_blocks
    )


# ---------------------------------------------------------------------------------------------------- HTTP client


class ScrapeError(Exception):
    pass


class _HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a pod: one GET at a time, Content-Length or chunked bodies."""

    __slots__ = ("transport", "_buf", "_fut", "_closed", "_max", "abandoned")

    def __init__(self, max_bytes: int) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._fut: asyncio.Future[tuple[int, bytes]] | None = None
        self._closed = False
        self._max = max_bytes
        self.abandoned = False  # the connect timed out: close the socket whenever it still completes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.abandoned:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        f = self._fut
        if f is not None and not f.done():
            # a body delimited by the connection close is complete now
            if not self._try_parse(eof=True):
                f.set_exception(ScrapeError(f"connection closed: {exc or 'EOF'}"))

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self._buf.clear()
        self._fut = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self._fut

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._max:
            f = self._fut
            if f is not None and not f.done():
                f.set_exception(ScrapeError(f"response larger than {self._max} bytes"))
            if self.transport is not None:
                self.transport.close()
            return
        self._try_parse(eof=False)

    def _try_parse(self, eof: bool) -> bool:
        f = self._fut
        if f is None or f.done():
            return True
        buf = self._buf
        he = buf.find(b"\r\n\r\n")
        if he == -1:
            return False
        head = bytes(buf[:he]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            f.set_exception(ScrapeError(f"bad status line {lines[0][:80]!r}"))
            return True
        length = -1
        chunked = False
        close = False
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                try:
                    length = int(v.strip())
                except ValueError:
                    f.set_exception(ScrapeError("bad content-length"))
                    return True
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "connection" and "close" in v.lower():
                close = True
        start = he + 4
        if chunked:
            body = _dechunk(buf, start)
            if body is None:
                if eof:
                    f.set_exception(ScrapeError("truncated chunked body"))
                    return True
                return False
        elif length >= 0:
            if len(buf) - start < length:
                if eof:
                    f.set_exception(ScrapeError("truncated body"))
                    return True
                return False
            body = bytes(buf[start : start + length])
        else:  # delimited by connection close
            if not eof:
                return False
            body = bytes(buf[start:])
            close = True
        if close and self.transport is not None:
            self._closed = True
            self.transport.close()
        f.set_result((status, body))
        return True


def _dechunk(buf: bytearray, pos: int) -> bytes | None:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol == -1:
            return None
        size_txt = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_txt, 16)
        except ValueError:
            raise ScrapeError("bad chunk size") from None
        pos = eol + 2
        if size == 0:
            return bytes(out) if buf.find(b"\r\n", pos) != -1 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class PodClient:
    """GETs against one pod over a reused connection (reconnects when the pod closed it)."""

    __slots__ = ("host", "port", "_conn", "_max")

    def __init__(self, address: str, max_bytes: int = 16 * 1024 * 1024) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self._conn: _HttpConn | None = None
        self._max = max_bytes

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        raw = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: */*\r\nUser-Agent: extproc-scraper\r\n\r\n".encode()
        async with asyncio.timeout(timeout_s):
            conn = self._conn
            if conn is None or not conn.usable:
                loop = asyncio.get_running_loop()
                proto = _HttpConn(self._max)
                try:
                    await loop.create_connection(lambda: proto, self.host, self.port)
                except BaseException:
                    # never leave a half-open socket behind (a storm of those exhausted a pod's descriptors)
                    proto.abandoned = True
                    if proto.transport is not None:
                        proto.transport.close()
                    raise
                conn = self._conn = proto
            try:
                return await conn.request(raw)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        c = self._conn
        self._conn = None
        if c is not None and c.transport is not None:
            c.transport.close()


# ---------------------------------------------------------------------------------------------------- scraper


@dataclass(slots=True)
class ScrapeSettings:
    interval_s: float = DEFAULT_SCRAPE_INTERVAL_S  # pods whose values change (or just got traffic after an idle spell)
    timeout_s: float = 1.0
    unhealthy_after: int = 5  # consecutive failures before a pod is filtered out
    models_interval_s: float = 5.0
    idle_interval_s: float = 1.0  # ceiling for idle, unchanged pods (keep it below the 2 s staleness bound)
    max_scrapes_per_s: float = 2000.0  # budget across the pool (0 = unlimited)
    max_inflight: int = 256  # scrapes in progress at once (slow pods cannot pile up connections)
    adaptive: bool = True  # False: every pod every interval_s (the reference's behaviour)


ScrapeHook = Callable[[Endpoint, bool, float], None]  # (endpoint, ok, seconds) → metrics


class _PodState:
    __slots__ = ("ep", "client", "interval", "due", "busy", "next_models", "last_touch", "removed")

    def __init__(self, ep: Endpoint, base: float) -> None:
        self.ep = ep
        self.client = PodClient(ep.address)
        self.interval = base
        self.due = 0.0
        self.busy = False
        self.next_models = 0.0
        self.last_touch = -1e9  # time.monotonic() of our last dispatch to it
        self.removed = False


# the server's scraper in the service registry (the handler tells it which pods just got a request)
SCRAPER: ServiceKey[MetricsScraper] = ServiceKey("scraper")


class MetricsScraper:
    """Scrapes every endpoint of the pool in the background (adaptive intervals, a global budget)."""

    def __init__(self, pool: EndpointPool, settings: ScrapeSettings | None = None, on_scrape: ScrapeHook | None = None) -> None:
        self.pool = pool
        self.settings = settings or ScrapeSettings()
        self.on_scrape = on_scrape
        self._pods: dict[str, _PodState] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._started = False
        self._opened = False
        self.scrapes = 0  # total scrapes started (tests, benchmarks)
        pool.add_listener(self._on_change)

    async def start(self, loops: bool = True) -> None:
        """Start the scrape scheduler (``loops=False``: tests drive ``scrape_once`` themselves)."""
        if self._opened:
            return
        self._opened = True
        self._started = loops
        for ep in self.pool.snapshot():
            self._add(ep)
        if loops:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scraper")

    async def stop(self) -> None:
        self._started = False
        self._opened = False
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._inflight.clear()
        for st in self._pods.values():
            st.client.close()
        self._pods.clear()
        self._heap.clear()

    def touch(self, ep: Endpoint) -> None:
        """We dispatched a request to ``ep`` (hot path: a dict lookup and a compare). A pod that had no traffic from
        us for ``idle_interval_s`` is scraped within ``interval_s``; after that its rate follows whether its values
        change (a busy vLLM pod's do at every scrape)."""
        st = self._pods.get(ep.address)
        if st is None:
            return
        now = time.monotonic()
        last, st.last_touch = st.last_touch, now
        if now - last < self.settings.idle_interval_s:
            return
        base = self.settings.interval_s
        st.interval = base
        if st.due > now + base and not st.busy and self._started:
            self._schedule(st, now + base)

    def _state(self, ep: Endpoint) -> _PodState:
        st = self._pods.get(ep.address)
        if st is None:
            st = self._pods[ep.address] = _PodState(ep, self.settings.interval_s)
        return st

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One scrape of one pod (used by the scheduler task and by tests)."""
        st = self._state(ep)
        s = self.settings
        t0 = time.monotonic()
        ok = False
        changed = True
        try:
            status, body = await st.client.get("/metrics", s.timeout_s)
            if status != 200:
                raise ScrapeError(f"/metrics answered {status}")
            new = parse_metrics(body)
            changed = not same_values(new, ep.metrics)
            ep.set_metrics(new)
            ok = True
        except (ScrapeError, OSError, TimeoutError, asyncio.TimeoutError, ValueError) as e:
            if ep.scrape_failed(f"{type(e).__name__}: {e}", s.unhealthy_after):
                log.warning("endpoint unhealthy", extra={"endpoint": ep.address, "failures": ep.scrape_failures, "error": ep.last_error})
        if ok and ep.scrape_ok():
            log.info("endpoint recovered", extra={"endpoint": ep.address})
        # next interval: changing or failing → base; unchanged → back off (our in-flight counters carry the load
        # signal meanwhile; touch() brings a pod that just got traffic after an idle spell back to the base rate)
        cap = max(s.idle_interval_s, s.interval_s)
        if not ok:
            # failing: back off too (doubling to the idle ceiling), so a pod that times out is not hammered and a
            # struggling pod gets room; 5 failures still take under 2 s plus their timeouts
            st.interval = min(max(st.interval, s.interval_s) * 2.0, cap) if ep.scrape_failures > 1 else s.interval_s
        elif not s.adaptive or changed:
            st.interval = s.interval_s
        else:
            st.interval = min(st.interval * 2.0, cap)
        if self.on_scrape is not None:
            self.on_scrape(ep, ok, time.monotonic() - t0)
        return ok

    async def fetch_models(self, ep: Endpoint) -> bool:
        st = self._state(ep)
        try:
            status, body = await st.client.get("/v1/models", self.settings.timeout_s)
            if status != 200:
                return False
            data = json.loads(body)
            ids = frozenset(m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str))
            if ids:
                ep.set_models(ids)
            return True
        except (ScrapeError, OSError, TimeoutError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            return False

    # ------------------------------------------------------------------ membership
    def _add(self, ep: Endpoint) -> None:
        if ep.address in self._pods and not self._pods[ep.address].removed:
            return
        st = self._pods[ep.address] = _PodState(ep, self.settings.interval_s)
        if self._started:
            self._schedule(st, time.monotonic())

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            st = self._pods.pop(ep.address, None)
            if st is not None:
                st.removed = True
                st.client.close()
        if self._opened:
            for ep in added:
                self._add(ep)

    # ------------------------------------------------------------------ scheduling
    def _schedule(self, st: _PodState, due: float) -> None:
        st.due = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, st.ep.address))
        w = self._wake
        if w is not None and self._heap[0][2] == st.ep.address:
            w.set()

    async def _run(self) -> None:
        s = self.settings
        heap = self._heap
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        tokens = 0.0
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if s.max_scrapes_per_s > 0:
                cap = max(1.0, s.max_scrapes_per_s * 0.1)
                tokens = min(cap, tokens + (now - last) * s.max_scrapes_per_s)
            last = now
            while heap and heap[0][0] <= now:
                if (s.max_scrapes_per_s > 0 and tokens < 1.0) or len(self._inflight) >= s.max_inflight:
                    break
                due, _, addr = heapq.heappop(heap)
                st = self._pods.get(addr)
                if st is None or st.removed or st.busy or due != st.due:
                    continue  # removed, already running, or rescheduled (stale heap entry)
                st.busy = True
                tokens -= 1.0
                self.scrapes += 1
                t = loop.create_task(self._one(st), name=f"scrape:{addr}")
                self._inflight.add(t)
                t.add_done_callback(self._inflight.discard)
            if len(self._inflight) >= s.max_inflight:
                delay = 3600.0  # a finishing scrape wakes us
            elif heap:
                delay = heap[0][0] - time.monotonic()
                if s.max_scrapes_per_s > 0 and tokens < 1.0:
                    delay = max(delay, (1.0 - tokens) / s.max_scrapes_per_s)
            else:
                delay = 3600.0
            wake.clear()
            if delay > 0:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that races the event being
                # set (a finishing scrape sets it), and stop() then awaits this loop forever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()

    async def _one(self, st: _PodState) -> None:
        ep = st.ep
        t0 = time.monotonic()
        try:
            if t0 >= st.next_models:
                ok = await self.fetch_models(ep)
                st.next_models = t0 + (self.settings.models_interval_s if ok else min(1.0, self.settings.models_interval_s))
            await self.scrape_once(ep)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one pod kill the data layer
            log.exception("scrape failed", extra={"endpoint": ep.address})
        finally:
            st.busy = False
            self._inflight.discard(asyncio.current_task())  # type: ignore[arg-type]
            if self._wake is not None:
                self._wake.set()  # a slot is free (max_inflight)
        if not st.removed and self._started:
            now = time.monotonic()
            # scrape-to-scrape period is the interval (a slow scrape does not make the next one later than needed)
            self._schedule(st, max(t0 + st.interval, now + st.interval * 0.2))
