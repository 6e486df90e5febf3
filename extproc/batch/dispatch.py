"""Dispatch of batch lines through the gateway: AIMD concurrency, retries with backoff, the batch objective.

Every line is POSTed to the gateway (Envoy → the scheduler), never straight to a pod, with
``x-gateway-inference-objective: batch`` (a sheddable, low-priority band in ``batch-interactive``),
``x-slo-ttft-ms`` = the time left to the job's deadline and, when the job has one, a fairness id
(``x-gateway-inference-fairness-id``) so the flow controller round-robins tenants.

Concurrency is AIMD (like llm-d-batch-gateway's dispatcher: min 5, max 100, ×0.5 on back-off, +1): the limit
grows by one per window of successes and halves — at most once per ``decrease_cooldown_s`` — on 429/503 and on
the gateway's saturation signal (its ``saturated`` shed answer). A line waiting to retry does not hold a slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

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
    max_retries: int = 5  # for other 5xx and transport errors; 429/503 are retried until the deadline
    backoff_s: float = 0.1
    backoff_cap_s: float = 5.0
    request_timeout_s: float = 600.0


class Aimd:
    """Additive-increase, multiplicative-decrease concurrency limit with a slot pool."""

    __slots__ = ("cfg", "limit", "inflight", "_successes", "_last_decrease", "_cond", "decreases")

    def __init__(self, cfg: DispatchConfig) -> None:
        self.cfg = cfg
        self.limit = float(max(cfg.min_concurrency, min(cfg.max_concurrency, cfg.initial_concurrency)))
        self.inflight = 0
        self._successes = 0
        self._last_decrease = 0.0
        self._cond = asyncio.Condition()
        self.decreases = 0

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.inflight < int(self.limit))
            self.inflight += 1

    async def release(self) -> None:
        async with self._cond:
            self.inflight -= 1
            self._cond.notify_all()

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= int(self.limit):  # one window of successes → +1
            self._successes = 0
            self.limit = min(float(self.cfg.max_concurrency), self.limit + 1.0)

    def on_backoff(self) -> None:
        now = time.monotonic()
        if now - self._last_decrease < self.cfg.decrease_cooldown_s:
            return  # one decrease per burst of rejections
        self._last_decrease = now
        self._successes = 0
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
            status, data, err = 0, b"", ""
            try:
                timeout = aiohttp.ClientTimeout(total=min(self.cfg.request_timeout_s, left))
                async with self.session.post(self.cfg.gateway + url, data=raw, headers=headers, timeout=timeout) as r:
                    status = r.status
                    data = await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
            finally:
                await self.aimd.release()
            self._count(status)
            if 200 <= status < 300:
                self.aimd.on_success()
                return Outcome(True, status, request_id, _json_or_text(data), retries=attempt)
            if status in BACKOFF_STATUSES:
                self.aimd.on_backoff()  # 429 (the gateway sheds batch when saturated) or 503: capacity is short
            elif status >= 500 or status == 0:
                hard_retries += 1
                if hard_retries > self.cfg.max_retries:
                    if status == 0:
                        return Outcome(False, 0, request_id, None, "gateway_unreachable", err or "no answer from the gateway", attempt)
                    return Outcome(False, status, request_id, _json_or_text(data), "server_error", f"the gateway answered {status} after {attempt + 1} attempts", attempt)
            else:  # a 4xx other than 429: the request itself is wrong; final
                return Outcome(False, status, request_id, _json_or_text(data), "request_failed", f"the model server answered {status}", attempt)
            await asyncio.sleep(min(self._sleep_for(attempt), max(0.0, deadline - time.time())))
            attempt += 1


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")
