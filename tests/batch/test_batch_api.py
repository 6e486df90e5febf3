"""The Batch API through real Envoy with the official ``openai`` client: files, batches, errors, a 2,000-line job,
invalid input with an error file, expiry with partial results, cancel, metrics."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys

import openai
import pytest

from tests.batch.helpers import MODEL, gateway, ids_of, jsonl, metric_sum, wait_status

pytestmark = pytest.mark.envoy


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def test_files_and_batches_endpoints_and_errors() -> None:
    async with gateway() as gw:
        c = _client(gw.url)
        f = await c.files.create(file=("in.jsonl", jsonl(3)), purpose="batch")
        assert f.object == "file" and f.purpose == "batch" and f.bytes == len(jsonl(3)) and f.filename == "in.jsonl"
        assert (await c.files.retrieve(f.id)).id == f.id
        assert (await c.files.content(f.id)).content == jsonl(3)
        assert f.id in [x.id for x in (await c.files.list()).data]
        # bad uploads and ids: OpenAI error shapes through Envoy
        with pytest.raises(openai.BadRequestError) as e:
            await c.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
        assert e.value.body["code"] == "invalid_purpose"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            await c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError) as e:
            await c.batches.create(input_file_id=f.id, endpoint="/v1/models", completion_window="24h")  # type: ignore[arg-type]
        assert e.value.body["param"] == "endpoint"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="soon")  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={str(i): "v" for i in range(17)})
        with pytest.raises(openai.NotFoundError):
            await c.batches.retrieve("batch_nope")
        with pytest.raises(openai.BadRequestError):
            await c.batches.list(limit=101)
        # create, list with limit/after, retrieve
        made = [await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"n": str(i)}) for i in range(3)]
        assert made[0].status == "validating" and made[0].request_counts.total == 0 and made[0].metadata == {"n": "0"}
        page = await c.batches.list(limit=2)
        assert [b.id for b in page.data] == [made[2].id, made[1].id] and page.has_more
        page2 = await c.batches.list(limit=2, after=made[1].id)
        assert [b.id for b in page2.data] == [made[0].id] and not page2.has_more
        done = await wait_status(c, made[0].id)
        assert done.status == "completed" and done.request_counts.completed == 3
        assert done.in_progress_at and done.finalizing_at and done.completed_at and done.output_file_id
        with pytest.raises(openai.ConflictError):
            await c.batches.cancel(done.id)
        # the CLI progress view, through Envoy
        st = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "extproc", "batch", "status", done.id, "--url", gw.url], capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        assert "completed" in st.stdout and "3/3" in st.stdout and done.output_file_id in st.stdout
        st = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "extproc", "batch", "status", "batch_nope", "--url", gw.url], capture_output=True, text=True, timeout=60)
        assert st.returncode != 0 and "404" in st.stderr
        out = (await c.files.content(done.output_file_id)).text
        line = json.loads(out.splitlines()[0])
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["body"]["object"] == "chat.completion"
        d = await c.files.delete(f.id)
        assert d.deleted and d.id == f.id
        with pytest.raises(openai.NotFoundError):
            await c.files.content(f.id)


async def test_2000_line_job_exact_counts_each_custom_id_once() -> None:
    async with gateway() as gw:
        c = _client(gw.url)
        before = await metric_sum(gw.metrics_url, "extproc_request_completions_total", outcome="ok")
        data = jsonl(2000, bad_model_every=200)  # 10 lines name a model the gateway does not serve → 404 from the gateway
        f = await c.files.create(file=("big.jsonl", data), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b = await wait_status(c, b.id, timeout_s=240)
        assert b.status == "completed"
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (2000, 1990, 10)
        out = ids_of((await c.files.content(b.output_file_id)).text)
        err_text = (await c.files.content(b.error_file_id)).text
        errs = ids_of(err_text)
        assert len(out) == 1990 and len(errs) == 10
        counts = collections.Counter(out + errs)
        assert set(counts) == {f"r{i}" for i in range(2000)} and max(counts.values()) == 1
        e0 = json.loads(err_text.splitlines()[0])
        assert e0["response"]["status_code"] == 404 and e0["error"]["code"] == "request_failed"
        assert e0["response"]["body"]["error"]["code"] == "model_not_found"  # answered by the scheduler: went through the gateway
        # every line went through the gateway: the scheduler dispatched each good one and rejected each bad one
        after = await metric_sum(gw.metrics_url, "extproc_request_completions_total", outcome="ok")
        assert after - before >= 1990
        assert await metric_sum(gw.metrics_url, "extproc_requests_total", status="404") == 10
        assert await metric_sum(gw.batch.url, "extproc_batch_lines_total", result="completed") == 1990  # type: ignore[union-attr]
        assert await metric_sum(gw.batch.url, "extproc_batch_lines_total", result="failed") == 10  # type: ignore[union-attr]
        assert await metric_sum(gw.batch.url, "extproc_batch_jobs", status="completed") == 1  # type: ignore[union-attr]
        assert await metric_sum(gw.batch.url, "extproc_batch_dispatch_concurrency") >= 5  # type: ignore[union-attr]


async def test_invalid_input_fails_with_error_file() -> None:
    async with gateway() as gw:
        c = _client(gw.url)
        good = jsonl(2).decode().splitlines()
        bad = [
            good[0],
            good[0],  # duplicate custom_id
            "not json",
            json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "stream": True}}),
            json.dumps({"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {"model": MODEL}}),
            json.dumps({"custom_id": "nm", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),
            good[1],
        ]
        f = await c.files.create(file=("bad.jsonl", ("\n".join(bad) + "\n").encode()), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b = await wait_status(c, b.id)
        assert b.status == "failed" and b.failed_at and b.output_file_id is None
        got = [(e.line, e.code) for e in b.errors.data]  # type: ignore[union-attr]
        assert got == [(2, "duplicate_custom_id"), (3, "invalid_json_line"), (4, "unsupported_value"), (5, "invalid_method"), (6, "missing_required_parameter")]
        err = [json.loads(x) for x in (await c.files.content(b.error_file_id)).text.splitlines()]  # type: ignore[arg-type]
        assert [e["error"]["code"] for e in err] == [code for _, code in got]
        assert all(e["error"]["message"].startswith(f"line {ln}") for e, (ln, _) in zip(err, got))


async def test_completion_window_expires_with_partial_results() -> None:
    # a slow fleet and one line on the wire at a time: the job cannot finish in 3 s
    async with gateway(time_scale=1.0, batch_args=("--min-concurrency", "1", "--initial-concurrency", "1", "--max-concurrency", "1")) as gw:
        c = _client(gw.url)
        f = await c.files.create(file=("slow.jsonl", jsonl(200, max_tokens=16)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="3s")  # type: ignore[arg-type]
        b = await wait_status(c, b.id, timeout_s=60)
        assert b.status == "expired" and b.expired_at
        rc = b.request_counts
        assert rc.total == 200 and rc.completed + rc.failed == 200 and 0 < rc.completed < 200
        out = ids_of((await c.files.content(b.output_file_id)).text)  # type: ignore[arg-type]
        err_text = (await c.files.content(b.error_file_id)).text  # type: ignore[arg-type]
        errs = ids_of(err_text)
        assert len(out) == rc.completed and len(errs) == rc.failed
        assert sorted(out + errs) == sorted(f"r{i}" for i in range(200))
        assert {json.loads(x)["error"]["code"] for x in err_text.splitlines()} == {"batch_expired"}


async def test_cancel_keeps_finished_lines() -> None:
    async with gateway(time_scale=1.0, batch_args=("--min-concurrency", "2", "--initial-concurrency", "2", "--max-concurrency", "2")) as gw:
        c = _client(gw.url)
        f = await c.files.create(file=("c.jsonl", jsonl(100, max_tokens=8)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        await wait_status(c, b.id, pred=lambda x: x.request_counts.completed >= 2)
        cb = await c.batches.cancel(b.id)
        assert cb.status in ("cancelling", "cancelled") and cb.cancelling_at
        b = await wait_status(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at
        rc = b.request_counts
        assert rc.total == 100 and rc.completed >= 2 and rc.completed + rc.failed == 100
        errs = ids_of((await c.files.content(b.error_file_id)).text)  # type: ignore[arg-type]
        out = ids_of((await c.files.content(b.output_file_id)).text)  # type: ignore[arg-type]
        assert sorted(out + errs) == sorted(f"r{i}" for i in range(100))
