"""Dispatch of batch lines through the gateway: AIMD concurrency, retries with backoff, the batch objective.

Every line is POSTed to the gateway (Envoy → the scheduler), never straight to a pod, with
``x-gateway-inference-objective: batch`` (a sheddable, low-priority band in ``batch-interactive``),
``x-slo-ttft-ms`` = the time left to the job's deadline and, when the job has one, a fairness id
(``x-gateway-inference-fairness-id``) so the flow controller round-robins tenants.

Concurrency is AIMD (like llm-d-batch-gateway's dispatcher: min 5, max 100, ×0.5 on back-off, +1); see
:class:`Aimd` for the increase rule and the two back-off signals (the gateway's ``saturated`` shed holds the
limit at the admitted level; other 429s and 503s halve it). A line waiting to retry does not hold a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

# the scheduler's free batch slots right after it admitted a line (Envoy echoes it on the response)
from extproc.contract import BATCH_HEADROOM_HEADER

log = logging.getLogger(__name__)

OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
SLO_TTFT_HEADER = "x-slo-ttft-ms"
BACKOFF_STATUSES = frozenset({429, 503})


@dataclass(slots=True)
class DispatchConfig:
    gateway: str  # http://envoy:port
    objective: str = "batch"
    min_concurrency: int = 5
    max_concurrency: int = 100
    initial_concurrency: int = 5
    decrease_factor: float = 0.5
    decrease_cooldown_s: float = 0.5
    increase_interval_s: float = 0.25
    race_window_s: float = 0.05  # a saturated shed this soon after a completion does not lower the limit
    use_headroom: bool = True  # size the limit from the gateway's x-gateway-batch-headroom answers
    headroom_ttl_s: float = 10.0  # without such an answer for this long, the interval probe takes over again
    headroom_hold_s: float = 2.0  # after a saturated shed, headroom answers (stale by a line's duration) only lower
    max_retries: int = 5  # for other 5xx and transport errors; 429/503 are retried until the deadline
    backoff_s: float = 0.1
    backoff_cap_s: float = 5.0
    request_timeout_s: float = 600.0


class Aimd:
    """Additive-increase, multiplicative-decrease concurrency limit with a slot pool.

    * increase: +1 per success while the limit is in use (as Netflix concurrency-limits' AIMDLimit), and +1 per
      ``increase_interval_s`` while every slot is taken — batch lines can run for many seconds, and a limit that
      only grows on completions would take minutes to find the gateway's admission level;
    * soft signal — the gateway's ``saturated`` shed (429): batch has reached the share the gateway admits;
      hold the limit at what is in flight now (probing up again after an interval);
    * hard signal — any other 429 or a 503: the limit × ``decrease_factor`` (default 0.5, as the reference).
    At most one decrease per ``decrease_cooldown_s`` (one burst of rejections is one signal).
    * the gateway's headroom (``x-gateway-batch-headroom`` on an admitted line's answer): when the line was
      admitted, ``free`` more batch slots were open while ``sent_inflight`` of ours were on the wire, so the level
      the gateway admits was ``sent_inflight + free``: the limit is set to it (up or down). While such answers
      arrive (``headroom_ttl_s``), neither the interval probe nor completions raise the limit: the level is told,
      not discovered through 429s. Without the header (another gateway config), AIMD alone, as above.
    """

    __slots__ = ("cfg", "limit", "inflight", "_last_change", "_last_decrease", "_last_hold", "_freed", "_last_ok", "_guided_until", "_last_shed",
                 "decreases", "holds", "races", "headroom_updates")  # fmt: skip

    def __init__(self, cfg: DispatchConfig) -> None:
        self.cfg = cfg
        self.limit = float(max(cfg.min_concurrency, min(cfg.max_concurrency, cfg.initial_concurrency)))
        self.inflight = 0
        self._last_change = 0.0
        self._last_decrease = -1e18
        self._last_hold = -1e18
        self._freed = asyncio.Event()
        self.decreases = 0
        self.holds = 0
        self.races = 0
        self._last_ok = -1e18
        self._guided_until = -1e18
        self._last_shed = -1e18
        self.headroom_updates = 0

    async def acquire(self) -> None:
        # single-threaded event loop: the check and the increment below run without an await in between
        while self.inflight >= int(self.limit):
            now = time.monotonic()
            if self.limit < self.cfg.max_concurrency and now - self._last_change >= self.cfg.increase_interval_s and now >= self._guided_until:
                self.limit += 1.0  # every slot busy for a whole interval without a rejection: probe one more
                self._last_change = now
                continue
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a racing cancel
                async with asyncio.timeout(self.cfg.increase_interval_s):
                    await self._freed.wait()
        self.inflight += 1

    def guided(self) -> bool:
        """The gateway's headroom answers set the limit (one arrived within ``headroom_ttl_s``)."""
        return time.monotonic() < self._guided_until

    def release(self) -> None:
        """Synchronous on purpose: a release that awaited (a lock) could be interrupted by a cancellation and
        leak its slot — that happened when a cancelled job's lines were dropped mid-request."""
        self.inflight -= 1
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()

    def on_success(self) -> None:
        self._last_ok = time.monotonic()
        # no growth on completions right after a saturated shed: a completion frees its slot for the next line,
        # and the interval probe alone looks for more room
        now = self._last_ok
        if now < self._guided_until:
            return  # the gateway's headroom sets the level
        if self.inflight * 2 >= int(self.limit) and now - self._last_hold >= self.cfg.increase_interval_s:
            self.limit = min(float(self.cfg.max_concurrency), self.limit + 1.0)

    def on_headroom(self, sent_inflight: int, free: int) -> None:
        """The gateway admitted a line while ``sent_inflight`` of ours were on the wire and left ``free`` batch
        slots: set the limit to that admitted level (see the class docstring)."""
        now = time.monotonic()
        self._guided_until = now + self.cfg.headroom_ttl_s
        self._last_change = now
        target = float(max(self.cfg.min_concurrency, min(self.cfg.max_concurrency, sent_inflight + free)))
        # the answer arrives when the line ends: its count is as old as the line. Right after a shed (fresh
        # news: full now) an older count may lower the limit but not raise it again
        if target < self.limit or now - self._last_shed >= self.cfg.headroom_hold_s:
            self.limit = target
        self.headroom_updates += 1

    def is_race(self) -> bool:
        """A saturated shed now would most likely be the completion race (see :meth:`on_saturated`)."""
        return time.monotonic() - self._last_ok < self.cfg.race_window_s

    def _may_decrease(self) -> bool:
        now = time.monotonic()
        if now - self._last_decrease < self.cfg.decrease_cooldown_s:
            return False
        self._last_decrease = self._last_change = now
        return True

    def on_saturated(self) -> None:
        """Soft signal: hold at the admitted level (what is in flight now; the rejected request has given its slot
        back). Applied on every such answer, without the cooldown, so rejections do not churn. Exception: right
        after a completion (``race_window_s``) the shed is most likely a race — the next line reached the
        scheduler before the finished one's end did — and the level is kept."""
        now = time.monotonic()
        self._last_hold = self._last_change = now
        if now - self._last_ok < self.cfg.race_window_s:
            self.races += 1
            return
        self.limit = max(float(self.cfg.min_concurrency), min(self.limit, float(self.inflight)))
        self.holds += 1
        self._last_shed = now

    def on_backoff(self) -> None:
        """Hard signal: multiplicative decrease."""
        if self._may_decrease():
            self.limit = max(float(self.cfg.min_concurrency), self.limit * self.cfg.decrease_factor)
            self.decreases += 1


@dataclass(slots=True)
class Outcome:
    ok: bool  # a 2xx answer
    status: int  # 0 = no answer (transport error, deadline)
    request_id: str
    body: Any
    error_code: str = ""
    error_message: str = ""
    retries: int = 0


class Dispatcher:
    def __init__(self, cfg: DispatchConfig, session: aiohttp.ClientSession, *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.aimd = Aimd(cfg)
        self.rng = random.Random(seed)
        self.responses: dict[str, int] = {}  # status class → count (metrics)

    def _sleep_for(self, attempt: int) -> float:
        return min(self.cfg.backoff_cap_s, self.cfg.backoff_s * (2.0**attempt)) * (0.5 + self.rng.random())

    def _count(self, status: int) -> None:
        k = str(status) if status else "error"
        self.responses[k] = self.responses.get(k, 0) + 1

    async def send(self, url: str, body: dict[str, Any], *, request_id: str, deadline: float, fairness_id: str = "") -> Outcome:
        """Send one line until it gets a final answer or the deadline (wall clock, epoch seconds) passes."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        attempt = 0
        hard_retries = 0
        while True:
            left = deadline - time.time()
            if left <= 0:
                return Outcome(False, 0, request_id, None, "batch_expired", "the completion window ended before this request got an answer", attempt)
            headers = {
                "content-type": "application/json",
                OBJECTIVE_HEADER: self.cfg.objective,
                SLO_TTFT_HEADER: str(max(1, min(int(left * 1000), 999_999_999))),
                "x-request-id": request_id,
            }
            if fairness_id:
                headers[FAIRNESS_HEADER] = fairness_id
            await self.aimd.acquire()
            sent_inflight = self.aimd.inflight
            status, data, err = 0, b"", ""
            free = -1
            try:
                timeout = aiohttp.ClientTimeout(total=min(self.cfg.request_timeout_s, left))
                async with self.session.post(self.cfg.gateway + url, data=raw, headers=headers, timeout=timeout) as r:
                    status = r.status
                    if self.cfg.use_headroom:
                        free = _int_header(r.headers.get(BATCH_HEADROOM_HEADER))
                    data = await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
            finally:
                # synchronous in every branch (a cancelled send must give its slot back, see Aimd.release)
                held = self._release_slot(status, free, data)
            self._count(status)
            if 200 <= status < 300:
                self.aimd.on_success()
                if free >= 0:
                    self.aimd.on_headroom(sent_inflight, free)
                return Outcome(True, status, request_id, _json_or_text(data), retries=attempt)
            if status == 429 and _error_code(data) == "saturated":
                self.aimd.on_saturated()  # the gateway sheds batch: the batch share of the fleet is full
            elif status in BACKOFF_STATUSES:
                self.aimd.on_backoff()  # rate limited or unavailable: back off hard
            elif status >= 500 or status == 0:
                hard_retries += 1
                if hard_retries > self.cfg.max_retries:
                    if status == 0:
                        return Outcome(False, 0, request_id, None, "gateway_unreachable", err or "no answer from the gateway", attempt)
                    return Outcome(False, status, request_id, _json_or_text(data), "server_error", f"the gateway answered {status} after {attempt + 1} attempts", attempt)
            else:  # a 4xx other than 429: the request itself is wrong; final
                return Outcome(False, status, request_id, _json_or_text(data), "request_failed", f"the model server answered {status}", attempt)
            try:
                await asyncio.sleep(min(self._sleep_for(attempt), max(0.0, deadline - time.time())))
            finally:
                if held:
                    self.aimd.release()
            attempt += 1

    def _release_slot(self, status: int, free: int, data: bytes) -> bool:
        """Give the slot back after an answer; True when the caller keeps it until its retry.

        While the gateway's headroom guides the limit, the level is full when a line was admitted with
        ``free == 0``, and a line sent at once into the slot its answer frees reaches the scheduler before the
        end of the finished one does (Envoy reports it asynchronously): a 429 race. So that slot comes back
        ``race_window_s`` later. And a line shed as ``saturated`` in that race keeps its slot while it waits to
        retry: otherwise the next waiting line takes it at once, is shed too, and the rejections churn. A shed
        outside the race window gives the slot back, and :meth:`Aimd.on_saturated` holds the limit below it."""
        a = self.aimd
        if free < 0 and not a.guided():  # neither this answer nor a recent one carried the headroom
            a.release()
            return False
        if 200 <= status < 300 and free == 0:
            asyncio.get_running_loop().call_later(self.cfg.race_window_s, a.release)
            return False
        if status == 429 and _error_code(data) == "saturated" and a.is_race():
            return True  # retried soon in its own slot; a real shed gives the slot back and lowers the limit
        a.release()
        return False


def _int_header(v: str | None) -> int:
    """A non-negative integer header value, or -1 when absent or malformed."""
    if v is None or not v.isascii() or not v.isdigit() or len(v) > 9:
        return -1
    return int(v)


def _error_code(data: bytes) -> str:
    try:
        err = json.loads(data).get("error") or {}
        return str(err.get("code") or "")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")
