"""The batch service: API operations and the worker that validates, dispatches, expires and finalizes jobs.

Several replicas may share one store (PostgreSQL): each has an ``owner`` id; validation and finalization of a
batch need the batch lease, lines are claimed with line leases, and every lease is renewed by a heartbeat. A
replica that dies stops renewing; after ``lease_s`` its lines are claimed again by whoever is alive (or by
itself after a restart), and its half-done finalization is redone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.batch import model as m
from extproc.batch.dispatch import DispatchConfig, Dispatcher, Outcome
from extproc.batch.metrics import BatchMetrics
from extproc.batch.store import ClaimedLine, Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServiceConfig:
    dispatch: DispatchConfig
    owner: str = ""
    lease_s: float = 10.0
    tick_s: float = 0.2
    claim_chunk: int = 64
    max_lines: int = m.MAX_LINES
    max_file_bytes: int = 200 * 1024 * 1024


def _output_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-{kind}"


class BatchService:
    def __init__(self, store: Store, cfg: ServiceConfig, metrics: BatchMetrics | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.owner = cfg.owner or f"replica-{secrets.token_hex(4)}"
        self.metrics = metrics or BatchMetrics()
        self._session: aiohttp.ClientSession | None = None
        self.dispatcher: Dispatcher | None = None
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._metrics_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.store.open()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=True)
        self.dispatcher = Dispatcher(self.cfg.dispatch, self._session)
        self.metrics.bind(self)
        self._loops = [asyncio.create_task(self._work_loop(), name="batch-work"), asyncio.create_task(self._heartbeat(), name="batch-heartbeat")]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._loops:
            t.cancel()
        for t in list(self._tasks.values()):
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks.values(), return_exceptions=True)
        # hand the lines we held back at once (a graceful stop; a crash waits for the lease to run out)
        for bid, idx in list(self._tasks):
            with contextlib.suppress(Exception):
                await self.store.release_line(bid, idx, self.owner)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
        await self.store.close()

    # ------------------------------------------------------------------ files API
    async def create_file(self, filename: str, purpose: str, data: bytes) -> m.FileRecord:
        if purpose != "batch":
            raise m.ApiError(400, f"purpose {purpose!r} is not supported here; use 'batch'", param="purpose", code="invalid_purpose")
        if not data:
            raise m.ApiError(400, "the uploaded file is empty", param="file", code="empty_file")
        rec = m.FileRecord(m.new_id("file-"), len(data), m.now_s(), filename or "upload.jsonl", purpose)
        await self.store.put_file(rec, data)
        return rec

    async def get_file(self, file_id: str) -> m.FileRecord:
        rec = await self.store.get_file(file_id)
        if rec is None:
            raise m.ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return rec

    async def file_content(self, file_id: str) -> bytes:
        data = await self.store.file_content(file_id)
        if data is None:
            raise m.ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return data

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        if not await self.store.delete_file(file_id):
            raise m.ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ batches API
    async def create_batch(self, body: Any, fairness_id: str = "") -> m.BatchRecord:
        if not isinstance(body, dict):
            raise m.ApiError(400, "the request body must be a JSON object")
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or not fid:
            raise m.ApiError(400, "input_file_id is required", param="input_file_id", code="missing_required_parameter")
        endpoint = body.get("endpoint")
        if endpoint not in m.ALLOWED_URLS:
            raise m.ApiError(400, f"endpoint must be one of {', '.join(m.ALLOWED_URLS)}", param="endpoint", code="invalid_endpoint")
        window = body.get("completion_window", "24h")
        window_s = m.parse_window(window)
        md = m.check_metadata(body.get("metadata"))
        f = await self.store.get_file(fid)
        if f is None:
            raise m.ApiError(404, f"No such File object: {fid}", param="input_file_id", code="file_not_found")
        if f.purpose != "batch":
            raise m.ApiError(400, f"file {fid} has purpose {f.purpose!r}; a batch input needs purpose 'batch'", param="input_file_id", code="invalid_file")
        now = m.now_s()
        rec = m.BatchRecord(
            id=m.new_id("batch_"), endpoint=endpoint, input_file_id=fid, completion_window=window, status=m.VALIDATING,
            created_at=now, expires_at=int(now + window_s), metadata=md, fairness_id=fairness_id or (md or {}).get("fairness_id", ""),
        )  # fmt: skip
        out = await self.store.create_batch(rec)
        self._wake.set()
        return out

    async def get_batch(self, batch_id: str) -> m.BatchRecord:
        b = await self.store.get_batch(batch_id)
        if b is None:
            raise m.ApiError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        if b.status in (m.IN_PROGRESS, m.CANCELLING, m.FINALIZING):
            c = await self.store.line_counts(batch_id)
            b.completed, b.failed = c.get("done", 0), c.get("failed", 0)
        return b

    async def list_batches(self, limit: int, after: str | None) -> tuple[list[m.BatchRecord], bool]:
        items, more = await self.store.list_batches(limit, after)
        return [await self.get_batch(b.id) if b.status in m.ACTIVE else b for b in items], more

    async def cancel_batch(self, batch_id: str) -> m.BatchRecord:
        for _ in range(5):
            b = await self.get_batch(batch_id)
            if b.status in (m.CANCELLING, m.CANCELLED):
                return b
            if b.status not in (m.VALIDATING, m.IN_PROGRESS):
                raise m.ApiError(409, f"Cannot cancel a batch with status '{b.status}'.", code="batch_not_cancellable", type="invalid_request_error")
            prev = b.status
            b.status, b.cancelling_at = m.CANCELLING, m.now_s()
            if await self.store.save_batch(b, expect_status=prev):
                self._wake.set()
                return b
        raise m.ApiError(409, "the batch changed while it was being cancelled; retry", code="conflict")

    # ------------------------------------------------------------------ worker
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_s / 3.0)
            try:
                await self.store.extend_leases(self.owner, self.cfg.lease_s)
            except Exception:
                log.exception("lease heartbeat failed")

    async def _work_loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch worker tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a racing cancel
                async with asyncio.timeout(self.cfg.tick_s):
                    await self._wake.wait()

    async def _tick(self) -> None:
        batches = await self.store.active_batches()
        now = time.time()
        if now - self._metrics_at >= 1.0:
            self._metrics_at = now
            await self.metrics.refresh(self.store)
        for b in batches:
            if self._stopping:
                return
            if b.status == m.VALIDATING:
                if await self.store.lease_batch(b.id, self.owner, self.cfg.lease_s):
                    await self._validate(b)
            elif b.status == m.CANCELLING:
                if await self.store.lease_batch(b.id, self.owner, self.cfg.lease_s):
                    self._drop_local(b.id)
                    await self.store.fail_unfinished(b.id, "batch_cancelled", "the batch was cancelled before this request was sent")
                    await self._finalize(b, m.CANCELLED)
            elif b.status == m.FINALIZING:
                if await self.store.lease_batch(b.id, self.owner, self.cfg.lease_s):
                    await self._finalize(b, m.COMPLETED)
            elif b.status == m.IN_PROGRESS:
                if now >= b.expires_at:
                    if await self.store.lease_batch(b.id, self.owner, self.cfg.lease_s):
                        self._drop_local(b.id)
                        await self.store.fail_unfinished(b.id, "batch_expired", "this request was not completed within the batch's completion window")
                        await self._finalize(b, m.EXPIRED)
                    continue
                await self._fill(b)

    def _held(self) -> int:
        return len(self._tasks)

    async def _fill(self, b: m.BatchRecord) -> None:
        assert self.dispatcher is not None
        # hold at most about twice the concurrency limit: enough to keep every slot busy while some lines back off
        room = max(self.cfg.claim_chunk // 4, int(self.dispatcher.aimd.limit) * 2) - self._held()
        if room > 0:
            claimed = await self.store.claim_lines(b.id, self.owner, min(room, self.cfg.claim_chunk), self.cfg.lease_s)
            for c in claimed:
                key = (c.batch_id, c.idx)
                if key in self._tasks:
                    continue  # our own lease ran out and we took the line again: it is still being sent
                self._tasks[key] = asyncio.create_task(self._run_line(b, c), name=f"line-{b.id}-{c.idx}")
            if claimed:
                return
        if room > 0 and not any(k[0] == b.id for k in self._tasks):
            c = await self.store.line_counts(b.id)
            if not c.get("pending") and not c.get("running"):
                b2 = await self.store.get_batch(b.id)
                if b2 is not None and b2.status == m.IN_PROGRESS:
                    b2.status, b2.finalizing_at = m.FINALIZING, m.now_s()
                    if await self.store.save_batch(b2, expect_status=m.IN_PROGRESS):
                        self._wake.set()

    def _drop_local(self, batch_id: str) -> None:
        for key, t in list(self._tasks.items()):
            if key[0] == batch_id:
                t.cancel()

    async def _run_line(self, b: m.BatchRecord, c: ClaimedLine) -> None:
        assert self.dispatcher is not None
        key = (c.batch_id, c.idx)
        try:
            out: Outcome = await self.dispatcher.send(c.url, c.body, request_id=f"{b.id}-{c.idx}", deadline=float(b.expires_at), fairness_id=b.fairness_id)
            if out.ok:
                result = m.output_line(c.custom_id, out.status, out.request_id, out.body)
            elif out.error_code == "batch_expired":
                return  # the expiry pass closes it (with every other unfinished line) under the batch lease
            else:
                resp = {"status_code": out.status, "request_id": out.request_id, "body": out.body} if out.status else None
                result = m.error_line(c.custom_id, out.error_code, out.error_message, resp)
            if await self.store.finish_line(c.batch_id, c.idx, out.ok, result):
                self.metrics.line_done(out.ok)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("line %s/%d failed unexpectedly; it goes back to the queue", c.batch_id, c.idx)
            with contextlib.suppress(Exception):
                await self.store.release_line(c.batch_id, c.idx, self.owner)
        finally:
            self._tasks.pop(key, None)
            self._wake.set()

    async def _validate(self, b: m.BatchRecord) -> None:
        data = await self.store.file_content(b.input_file_id)
        if data is None:
            await self._fail(b, [m.LineError(1, None, "file_not_found", f"the input file {b.input_file_id} no longer exists")])
            return
        v = await asyncio.to_thread(m.validate_input, data, b.endpoint, max_lines=self.cfg.max_lines)
        if v.errors:
            await self._fail(b, v.errors)
            return
        await self.store.insert_lines(b.id, v.lines)
        cur = await self.store.get_batch(b.id)
        if cur is None or cur.status != m.VALIDATING:
            if cur is not None and cur.status == m.CANCELLING:
                self._wake.set()
            return
        cur.total, cur.status, cur.in_progress_at = len(v.lines), m.IN_PROGRESS, m.now_s()
        await self.store.save_batch(cur, expect_status=m.VALIDATING)
        await self.store.release_batch(b.id, self.owner)
        self._wake.set()

    async def _fail(self, b: m.BatchRecord, errors: list[m.LineError]) -> None:
        text = "".join(m.dumps(m.error_line(e.custom_id, e.code, e.message)) + "\n" for e in errors)
        efid = _output_file_id(b.id, "errors")
        await self.store.put_file(m.FileRecord(efid, len(text.encode()), m.now_s(), f"{b.id}_errors.jsonl", "batch_output"), text.encode())
        cur = await self.store.get_batch(b.id) or b
        cur.status, cur.failed_at = m.FAILED, m.now_s()
        cur.errors = [e.to_api() for e in errors[: m.MAX_ERRORS_IN_BATCH]]
        cur.error_file_id = efid
        await self.store.save_batch(cur, expect_status=m.VALIDATING)
        await self.store.release_batch(b.id, self.owner)

    async def _finalize(self, b: m.BatchRecord, final: str) -> None:
        rows = await self.store.results(b.id)
        out_lines, err_lines = [], []
        for _idx, state, result in rows:
            (out_lines if state == "done" else err_lines).append(result + "\n")
        cur = await self.store.get_batch(b.id)
        if cur is None or cur.status in m.TERMINAL:
            return
        prev = cur.status
        if out_lines:
            data = "".join(out_lines).encode()
            fid = _output_file_id(b.id, "output")
            await self.store.put_file(m.FileRecord(fid, len(data), m.now_s(), f"{b.id}_output.jsonl", "batch_output"), data)
            cur.output_file_id = fid
        if err_lines:
            data = "".join(err_lines).encode()
            fid = _output_file_id(b.id, "errors")
            await self.store.put_file(m.FileRecord(fid, len(data), m.now_s(), f"{b.id}_errors.jsonl", "batch_output"), data)
            cur.error_file_id = fid
        cur.completed, cur.failed = len(out_lines), len(err_lines)
        cur.status = final
        t = m.now_s()
        if final == m.COMPLETED:
            cur.completed_at = t
        elif final == m.EXPIRED:
            cur.expired_at = t
        elif final == m.CANCELLED:
            cur.cancelled_at = t
        if await self.store.save_batch(cur, expect_status=prev):
            self.metrics.job_finished(final)
            log.info("batch %s %s: %d completed, %d failed of %d", b.id, final, cur.completed, cur.failed, cur.total)
        await self.store.release_batch(b.id, self.owner)
