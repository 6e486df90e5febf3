"""The store contract, on both backends: SQLite (embedded) and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.batch import model as m
from extproc.batch.store import PostgresStore, SQLiteStore, Store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = SQLiteStore(tmp_path / "data") if request.param == "sqlite" else PostgresStore(request.getfixturevalue("pg_dsn"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _lines(n: int) -> list[m.Line]:
    return [m.Line(i, f"c{i}", "/v1/completions", {"model": "x", "prompt": f"p{i}"}, "x", f"x|{i % 3}") for i in range(n)]


async def _batch(s: Store, bid: str = "batch_a") -> m.BatchRecord:
    return await s.create_batch(m.BatchRecord(id=bid, endpoint="/v1/completions", input_file_id="file-1", completion_window="24h", status=m.IN_PROGRESS, created_at=1, expires_at=2))


async def test_files_roundtrip_and_list(store: Store) -> None:
    for i in range(3):
        await store.put_file(m.FileRecord(f"file-{i}", 3, 10 + i, f"f{i}.jsonl", "batch"), b"abc")
    assert (await store.get_file("file-1")) == m.FileRecord("file-1", 3, 11, "f1.jsonl", "batch")
    assert await store.file_content("file-2") == b"abc"
    page, more = await store.list_files("batch", 2, None)
    assert [f.id for f in page] == ["file-2", "file-1"] and more
    page, more = await store.list_files("batch", 2, "file-1")
    assert [f.id for f in page] == ["file-0"] and not more
    assert await store.delete_file("file-1") and not await store.delete_file("file-1")
    assert await store.file_content("file-1") is None and await store.get_file("file-1") is None


async def test_batches_list_newest_first_with_after(store: Store) -> None:
    for i in range(5):
        await _batch(store, f"batch_{i}")
    page, more = await store.list_batches(2, None)
    assert [b.id for b in page] == ["batch_4", "batch_3"] and more
    page, more = await store.list_batches(10, "batch_3")
    assert [b.id for b in page] == ["batch_2", "batch_1", "batch_0"] and not more


async def test_compare_and_set_status(store: Store) -> None:
    b = await _batch(store)
    b.status = m.CANCELLING
    assert await store.save_batch(b, expect_status=m.IN_PROGRESS)
    b.status = m.FINALIZING
    assert not await store.save_batch(b, expect_status=m.IN_PROGRESS)
    assert (await store.get_batch(b.id)).status == m.CANCELLING  # type: ignore[union-attr]


async def test_claims_are_disjoint_grouped_and_results_recorded_once(store: Store) -> None:
    b = await _batch(store)
    await store.insert_lines(b.id, _lines(30))
    await store.insert_lines(b.id, _lines(30))  # a redone validation inserts nothing twice
    a, c = await asyncio.gather(store.claim_lines(b.id, "A", 12, 30), store.claim_lines(b.id, "B", 12, 30))
    got_a, got_c = {x.idx for x in a}, {x.idx for x in c}
    assert len(got_a) == 12 and len(got_c) == 12 and not got_a & got_c
    rest = await store.claim_lines(b.id, "A", 100, 30)
    assert len(rest) == 6
    # grouped by prefix group: one claim of 10 from fresh lines takes whole groups in order
    assert await store.finish_line(b.id, a[0].idx, True, {"custom_id": a[0].custom_id})
    assert not await store.finish_line(b.id, a[0].idx, True, {"custom_id": a[0].custom_id})  # recorded once
    counts = await store.line_counts(b.id)
    assert counts == {"done": 1, "running": 29}


async def test_expired_lease_is_taken_over_and_heartbeat_keeps_it(store: Store) -> None:
    b = await _batch(store)
    await store.insert_lines(b.id, _lines(4))
    first = await store.claim_lines(b.id, "A", 2, 0.2)
    held = await store.claim_lines(b.id, "B", 2, 0.2)
    assert len(first) == 2 and len(held) == 2
    await asyncio.sleep(0.05)
    await store.extend_leases("B", 30)  # B is alive, A is not
    await asyncio.sleep(0.3)
    taken = await store.claim_lines(b.id, "C", 10, 30)
    assert {x.idx for x in taken} == {x.idx for x in first}
    assert all(x.attempts == 2 for x in taken)


async def test_fail_unfinished_and_results_in_input_order(store: Store) -> None:
    b = await _batch(store)
    await store.insert_lines(b.id, _lines(5))
    got = await store.claim_lines(b.id, "A", 2, 30)
    for x in got:
        await store.finish_line(b.id, x.idx, True, {"custom_id": x.custom_id})
    n = await store.fail_unfinished(b.id, "batch_expired", "late")
    assert n == 3
    rows = await store.results(b.id)
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(1 for r in rows if r[1] == "failed") == 3 and '"batch_expired"' in next(r[2] for r in rows if r[1] == "failed")


async def test_batch_lease_is_exclusive_until_it_runs_out(store: Store) -> None:
    b = await _batch(store)
    assert await store.lease_batch(b.id, "A", 0.2)
    assert not await store.lease_batch(b.id, "B", 0.2)
    assert await store.lease_batch(b.id, "A", 0.2)  # re-entrant
    await asyncio.sleep(0.3)
    assert await store.lease_batch(b.id, "B", 10)
    await store.release_batch(b.id, "B")
    assert await store.lease_batch(b.id, "A", 10)


async def test_queue_age(store: Store) -> None:
    assert await store.oldest_pending_created() is None
    b = await _batch(store)
    await store.insert_lines(b.id, _lines(2))
    age = time.time() - (await store.oldest_pending_created() or 0)
    assert 0 <= age < 5
