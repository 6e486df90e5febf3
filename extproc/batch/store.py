"""Durable state of the batch service: files, batches and the per-line queue.

Two backends behind one interface (:class:`Store`):

* :class:`SQLiteStore` (embedded default, one machine): metadata and the line queue in SQLite (WAL), file
  contents in a directory (written to a temporary name, fsynced, renamed).
* :class:`PostgresStore` (several batch replicas): metadata, queue and file contents in PostgreSQL; replicas
  claim lines with ``FOR UPDATE SKIP LOCKED`` and leases, so a replica that dies loses nothing.

Exactly-once results: a line's result is written only while the line is ``running`` (``UPDATE ... WHERE
state = 'running'``), and the line row is keyed by (batch, line) with custom_id unique per batch, so a line
retried after a crash or a lease takeover can be answered twice by the model but is recorded once. Output and
error files are assembled from the line rows at finalization, in input order; their ids are derived from the
batch id, so a finalization interrupted by a crash is simply redone.
"""

from __future__ import annotations

import abc

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from extproc.batch.model import BatchRecord, FileRecord, Line

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

_BATCH_FIELDS = [f.name for f in fields(BatchRecord) if f.name not in ("seq",)]


@dataclass(slots=True)
class ClaimedLine:
    batch_id: str
    idx: int
    custom_id: str
    url: str
    body: dict[str, Any]
    attempts: int


def _batch_from_row(seq: int, data: str) -> BatchRecord:
    d = json.loads(data)
    return BatchRecord(seq=seq, **{k: d.get(k) for k in _BATCH_FIELDS if k in d})


def _batch_json(b: BatchRecord) -> str:
    return json.dumps({k: getattr(b, k) for k in _BATCH_FIELDS}, separators=(",", ":"))


class Store(abc.ABC):
    """The interface both backends implement (all methods are coroutines; none blocks the event loop)."""

    dialect = "sql"

    # -- low level, per backend
    @abc.abstractmethod
    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def _put_blob(self, file_id: str, data: bytes) -> None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def _get_blob(self, file_id: str) -> bytes | None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def _delete_blob(self, file_id: str) -> None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Backend-specific (SQLiteStore, PostgresStore)."""

    def _schema(self) -> list[str]:
        blob_seq = "INTEGER PRIMARY KEY AUTOINCREMENT" if self.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
        return [
            "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, "
            "filename TEXT NOT NULL, purpose TEXT NOT NULL, expires_at BIGINT, seq BIGINT NOT NULL DEFAULT 0)",
            f"CREATE TABLE IF NOT EXISTS batches (seq {blob_seq}, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL, "
            "data TEXT NOT NULL, owner TEXT, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
            "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, "
            "grp TEXT NOT NULL, url TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
            "owner TEXT, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0, created DOUBLE PRECISION NOT NULL, result TEXT, "
            "PRIMARY KEY (batch_id, idx), UNIQUE (batch_id, custom_id))",
            "CREATE INDEX IF NOT EXISTS lines_queue ON lines (batch_id, state, grp, idx)",
        ]

    # -- files
    async def put_file(self, rec: FileRecord, data: bytes) -> None:
        await self._put_blob(rec.id, data)
        await self._execute("DELETE FROM files WHERE id = ?", (rec.id,))
        await self._execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose, expires_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.id, rec.bytes, rec.created_at, rec.filename, rec.purpose, rec.expires_at, time.time_ns()),
        )

    async def get_file(self, file_id: str) -> FileRecord | None:
        rows = await self._fetch("SELECT id, bytes, created_at, filename, purpose, expires_at FROM files WHERE id = ?", (file_id,))
        return FileRecord(*rows[0]) if rows else None

    async def file_content(self, file_id: str) -> bytes | None:
        if await self.get_file(file_id) is None:
            return None
        return await self._get_blob(file_id)

    async def delete_file(self, file_id: str) -> bool:
        n = await self._execute("DELETE FROM files WHERE id = ?", (file_id,))
        if n:
            await self._delete_blob(file_id)
        return bool(n)

    async def list_files(self, purpose: str | None, limit: int, after: str | None) -> tuple[list[FileRecord], bool]:
        args: list[Any] = []
        where = []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append("seq < (SELECT seq FROM files WHERE id = ?)")
            args.append(after)
        sql = "SELECT id, bytes, created_at, filename, purpose, expires_at FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = await self._fetch(sql, args)
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    # -- batches
    async def create_batch(self, b: BatchRecord) -> BatchRecord:
        await self._execute("INSERT INTO batches (id, status, data) VALUES (?, ?, ?)", (b.id, b.status, _batch_json(b)))
        got = await self.get_batch(b.id)
        assert got is not None
        return got

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        rows = await self._fetch("SELECT seq, data FROM batches WHERE id = ?", (batch_id,))
        return _batch_from_row(*rows[0]) if rows else None

    async def save_batch(self, b: BatchRecord, *, expect_status: str | None = None) -> bool:
        """Write the record; with ``expect_status``, only if the stored status is still that (compare and set)."""
        if expect_status is None:
            n = await self._execute("UPDATE batches SET status = ?, data = ? WHERE id = ?", (b.status, _batch_json(b), b.id))
        else:
            n = await self._execute("UPDATE batches SET status = ?, data = ? WHERE id = ? AND status = ?", (b.status, _batch_json(b), b.id, expect_status))
        return bool(n)

    async def list_batches(self, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        if after:
            rows = await self._fetch("SELECT seq, data FROM batches WHERE seq < (SELECT seq FROM batches WHERE id = ?) ORDER BY seq DESC LIMIT ?", (after, limit + 1))
        else:
            rows = await self._fetch("SELECT seq, data FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,))
        return [_batch_from_row(*r) for r in rows[:limit]], len(rows) > limit

    async def active_batches(self) -> list[BatchRecord]:
        rows = await self._fetch("SELECT seq, data FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY seq")
        return [_batch_from_row(*r) for r in rows]

    async def status_counts(self) -> dict[str, int]:
        return {s: int(n) for s, n in await self._fetch("SELECT status, COUNT(*) FROM batches GROUP BY status")}

    async def lease_batch(self, batch_id: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        n = await self._execute(
            "UPDATE batches SET owner = ?, lease_until = ? WHERE id = ? AND (owner IS NULL OR owner = ? OR lease_until < ?)",
            (owner, now + ttl_s, batch_id, owner, now),
        )
        return bool(n)

    async def release_batch(self, batch_id: str, owner: str) -> None:
        await self._execute("UPDATE batches SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?", (batch_id, owner))

    # -- lines
    async def insert_lines(self, batch_id: str, lines: Sequence[Line]) -> None:
        now = time.time()
        rows = [(batch_id, ln.idx, ln.custom_id, ln.group, ln.url, json.dumps(ln.body, separators=(",", ":")), PENDING, now) for ln in lines]
        for i in range(0, len(rows), 2000):
            await self._executemany(
                "INSERT INTO lines (batch_id, idx, custom_id, grp, url, body, state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows[i : i + 2000],
            )

    async def claim_lines(self, batch_id: str, owner: str, n: int, ttl_s: float) -> list[ClaimedLine]:
        """Take up to ``n`` lines that are pending (or whose holder's lease ran out), grouped by model and prefix."""
        now = time.time()
        if self.dialect == "postgres":
            # the CTE locks exactly the rows it picks; concurrent claimers skip them (no double claim)
            rows = await self._fetch(
                "WITH c AS (SELECT batch_id, idx FROM lines WHERE batch_id = ? AND "
                "(state = 'pending' OR (state = 'running' AND lease_until < ?)) ORDER BY grp, idx LIMIT ? FOR UPDATE SKIP LOCKED) "
                "UPDATE lines SET state = 'running', owner = ?, lease_until = ?, attempts = lines.attempts + 1 FROM c "
                "WHERE lines.batch_id = c.batch_id AND lines.idx = c.idx RETURNING lines.idx, lines.custom_id, lines.url, lines.body, lines.attempts",
                (batch_id, now, n, owner, now + ttl_s),
            )
        else:  # one connection, one writer: the statement is atomic
            rows = await self._fetch(
                "UPDATE lines SET state = 'running', owner = ?, lease_until = ?, attempts = attempts + 1 "
                "WHERE batch_id = ? AND idx IN (SELECT idx FROM lines WHERE batch_id = ? AND "
                "(state = 'pending' OR (state = 'running' AND lease_until < ?)) ORDER BY grp, idx LIMIT ?) "
                "RETURNING idx, custom_id, url, body, attempts",
                (owner, now + ttl_s, batch_id, batch_id, now, n),
            )
        out = [ClaimedLine(batch_id, int(r[0]), r[1], r[2], json.loads(r[3]), int(r[4])) for r in rows]
        out.sort(key=lambda c: c.idx)
        return out

    async def extend_leases(self, owner: str, ttl_s: float) -> None:
        t = time.time() + ttl_s
        await self._execute("UPDATE lines SET lease_until = ? WHERE owner = ? AND state = 'running'", (t, owner))
        await self._execute("UPDATE batches SET lease_until = ? WHERE owner = ?", (t, owner))

    async def finish_line(self, batch_id: str, idx: int, ok: bool, result: dict[str, Any]) -> bool:
        """Record a line's result once. False: the line was already finished (by a lease takeover or a cancel)."""
        n = await self._execute(
            "UPDATE lines SET state = ?, result = ?, owner = NULL WHERE batch_id = ? AND idx = ? AND state = 'running'",
            (DONE if ok else FAILED, json.dumps(result, separators=(",", ":"), ensure_ascii=False), batch_id, idx),
        )
        return bool(n)

    async def release_line(self, batch_id: str, idx: int, owner: str) -> None:
        """Give a claimed line back (shutdown) so another worker takes it at once."""
        await self._execute("UPDATE lines SET state = 'pending', owner = NULL, lease_until = 0 WHERE batch_id = ? AND idx = ? AND owner = ? AND state = 'running'", (batch_id, idx, owner))

    async def fail_unfinished(self, batch_id: str, code: str, message: str) -> int:
        """Close every line still pending or running with an error-file line (expiry, cancel)."""
        rows = await self._fetch("SELECT idx, custom_id FROM lines WHERE batch_id = ? AND state IN ('pending', 'running')", (batch_id,))
        from extproc.batch.model import error_line

        n = 0
        for idx, cid in rows:
            res = json.dumps(error_line(cid, code, message), separators=(",", ":"), ensure_ascii=False)
            n += await self._execute("UPDATE lines SET state = 'failed', result = ?, owner = NULL WHERE batch_id = ? AND idx = ? AND state IN ('pending', 'running')", (res, batch_id, int(idx)))
        return n

    async def line_counts(self, batch_id: str) -> dict[str, int]:
        return {s: int(n) for s, n in await self._fetch("SELECT state, COUNT(*) FROM lines WHERE batch_id = ? GROUP BY state", (batch_id,))}

    async def results(self, batch_id: str) -> list[tuple[int, str, str]]:
        rows = await self._fetch("SELECT idx, state, result FROM lines WHERE batch_id = ? AND state IN ('done', 'failed') ORDER BY idx", (batch_id,))
        return [(int(a), b, c) for a, b, c in rows]

    async def oldest_pending_created(self) -> float | None:
        rows = await self._fetch("SELECT MIN(created) FROM lines WHERE state IN ('pending', 'running')")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def drop_lines(self, batch_id: str) -> None:
        await self._execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))


class SQLiteStore(Store):
    """SQLite (WAL) for metadata and the queue; a directory for file contents. One connection on one thread."""

    dialect = "sqlite"

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.files_dir = self.dir / "files"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)

        def _open() -> None:
            c = sqlite3.connect(self.dir / "batch.sqlite3", check_same_thread=False, isolation_level=None, timeout=30.0)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")  # durable across a process kill (not a power cut) in WAL mode
            for stmt in self._schema():
                c.execute(stmt)
            self._conn = c

        await self._run(_open)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)

    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        def _x() -> int:
            assert self._conn is not None
            return self._conn.execute(sql, tuple(args)).rowcount

        return int(await self._run(_x))

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def _x() -> list[tuple[Any, ...]]:
            assert self._conn is not None
            return self._conn.execute(sql, tuple(args)).fetchall()

        return list(await self._run(_x))

    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        def _x() -> None:
            assert self._conn is not None
            c = self._conn
            c.execute("BEGIN")
            try:
                c.executemany(sql, rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        await self._run(_x)

    def _blob_path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad file id {file_id!r}")
        return self.files_dir / file_id

    async def _put_blob(self, file_id: str, data: bytes) -> None:
        def _x() -> None:
            p = self._blob_path(file_id)
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)

        await self._run(_x)

    async def _get_blob(self, file_id: str) -> bytes | None:
        def _x() -> bytes | None:
            try:
                return self._blob_path(file_id).read_bytes()
            except FileNotFoundError:
                return None

        result: bytes | None = await self._run(_x)
        return result

    async def _delete_blob(self, file_id: str) -> None:
        def _x() -> None:
            with contextlib.suppress(FileNotFoundError):
                self._blob_path(file_id).unlink()

        await self._run(_x)


def _pg_sql(sql: str) -> str:
    """``?`` placeholders → ``$1, $2, ...`` (no literal ``?`` appears in our SQL)."""
    out, n = [], 0
    for ch in sql:
        if ch == "?":
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


class PostgresStore(Store):
    """PostgreSQL (asyncpg) for metadata, the line queue and file contents: shared by several batch replicas."""

    dialect = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=8)
        async with self._pool.acquire() as c:
            # several replicas may start at once: serialise schema creation with an advisory lock
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(712345)")
                for stmt in self._schema():
                    await c.execute(stmt)
                await c.execute("CREATE TABLE IF NOT EXISTS file_blobs (id TEXT PRIMARY KEY, data BYTEA NOT NULL)")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status: str = await self._pool.execute(_pg_sql(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows = await self._pool.fetch(_pg_sql(sql), *args)
        return [tuple(r) for r in rows]

    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._pool.acquire() as c:
            async with c.transaction():
                await c.executemany(_pg_sql(sql), [tuple(r) for r in rows])

    async def _put_blob(self, file_id: str, data: bytes) -> None:
        await self._pool.execute("INSERT INTO file_blobs (id, data) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data", file_id, data)

    async def _get_blob(self, file_id: str) -> bytes | None:
        v = await self._pool.fetchval("SELECT data FROM file_blobs WHERE id = $1", file_id)
        return bytes(v) if v is not None else None

    async def _delete_blob(self, file_id: str) -> None:
        await self._pool.execute("DELETE FROM file_blobs WHERE id = $1", file_id)


def open_store(spec: str) -> Store:
    """``postgresql://...`` → PostgresStore; anything else is a data directory for SQLiteStore."""
    if spec.startswith(("postgres://", "postgresql://")):
        return PostgresStore(spec)
    return SQLiteStore(spec.removeprefix("sqlite://"))
