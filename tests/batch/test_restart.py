"""Crash safety: ``kill -9`` of the batch server mid-job, then a restart on the same store, loses and duplicates
no line (SQLite); two replicas on one PostgreSQL share a job and the survivor finishes a killed replica's lines."""

from __future__ import annotations

import collections
import sqlite3
from pathlib import Path

import openai
import pytest

from extproc.netutil import free_port
from tests.batch.helpers import gateway, ids_of, jsonl, metric_sum, wait_status

pytestmark = pytest.mark.envoy
N = 600  # the 2,000-line acceptance job is in test_batch_api.py; here a job long enough to die in the middle of


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=30)


def _check_exactly_once(out: list[str], errs: list[str]) -> None:
    counts = collections.Counter(out + errs)
    assert set(counts) == {f"r{i}" for i in range(N)}
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]


async def test_kill_9_mid_job_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    async with gateway(time_scale=0.05, store=store) as gw:
        c = _client(gw.url)
        f = await c.files.create(file=("in.jsonl", jsonl(N)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        mid = await wait_status(c, b.id, pred=lambda x: x.request_counts.completed >= 100, timeout_s=120)
        assert mid.status == "in_progress"
        assert gw.batch is not None
        await gw.batch.kill()  # SIGKILL: no cleanup, leases held, lines on the wire lost
        gw.batch = None
        with sqlite3.connect(Path(store) / "batch.sqlite3") as db:
            done_before = db.execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND state = 'done'", (b.id,)).fetchone()[0]
            running = db.execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND state = 'running'", (b.id,)).fetchone()[0]
        assert 100 <= done_before < N and running > 0  # it really died mid-job, holding lines
        gw.batch = await gw.start_batch("--lease", "1")  # same store, same port behind Envoy
        b = await wait_status(c, b.id, timeout_s=240)
        assert b.status == "completed"
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (N, N, 0)
        out = ids_of((await c.files.content(b.output_file_id)).text)  # type: ignore[arg-type]
        assert b.error_file_id is None
        _check_exactly_once(out, [])
        # the restarted server recorded exactly the lines the first one had not: nothing redone, nothing lost
        assert await metric_sum(gw.batch.url, "extproc_batch_lines_total", result="completed") == N - done_before


async def test_two_postgres_replicas_share_a_job_and_survive_a_kill(pg_dsn: str) -> None:
    async with gateway(time_scale=0.05, store=pg_dsn) as gw:
        assert gw.batch is not None
        other = await gw.start_batch("--lease", "1", port=free_port())
        try:
            c = _client(gw.url)  # replica A, behind Envoy
            cb = _client(other.url)  # replica B, straight (its API reads the same store)
            f = await c.files.create(file=("in.jsonl", jsonl(N)), purpose="batch")
            b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            assert (await cb.batches.retrieve(b.id)).id == b.id  # one shared store
            await wait_status(cb, b.id, pred=lambda x: x.request_counts.completed >= 100, timeout_s=120)
            a_done = await metric_sum(gw.batch.url, "extproc_batch_lines_total", result="completed")
            b_done = await metric_sum(other.url, "extproc_batch_lines_total", result="completed")
            assert a_done > 0 and b_done > 0  # both replicas dispatch lines of the one job
            await gw.batch.kill()
            gw.batch = None
            b = await wait_status(cb, b.id, timeout_s=240)
            assert b.status == "completed"
            assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (N, N, 0)
            _check_exactly_once(ids_of((await cb.files.content(b.output_file_id)).text), [])  # type: ignore[arg-type]
        finally:
            await other.stop()
