"""Fixtures of the batch-service tests: a real PostgreSQL server (Debian's packages), the simulated fleet.

PostgreSQL comes from Debian's ``postgresql`` package (``make test`` installs it: scripts/postgres_setup.sh).
Missing binaries skip these tests on a developer machine and FAIL them under CI (``CI`` set). The server runs
as the ``postgres`` user when the tests run as root (postgres refuses to run as root), on a free port, in a
temporary directory, and is stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.netutil import free_port


def _pg_bindir() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


def _missing(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI is set, so the PostgreSQL store tests must run (scripts/postgres_setup.sh installs it)", pytrace=False)
    pytest.skip(msg)


class PgServer:
    def __init__(self, bindir: str, root: Path, port: int, user: str | None) -> None:
        self.bindir, self.root, self.port, self.user = bindir, root, port, user
        self.data = root / "data"
        self.sock = root / "sock"

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)

    def start(self) -> None:
        self.sock.mkdir(parents=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            for p in (self.root, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        subprocess.run(self._cmd(f"{self.bindir}/initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"), check=True, capture_output=True)
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=100"
        subprocess.run(self._cmd(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start"), check=True, capture_output=True)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(self._cmd(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"), check=False, capture_output=True, timeout=60)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        subprocess.run([f"{self.bindir}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
        return self.dsn(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    if bindir is None:
        _missing("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _missing("the asyncpg package is not installed (pip install -e '.[test]')")
    assert bindir is not None
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and there is no 'postgres' user to run the server as")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="extproc-pg-"))
    srv = PgServer(bindir, root, free_port(), user)
    try:
        srv.start()
    except subprocess.CalledProcessError as e:
        log = (root / "pg.log").read_text() if (root / "pg.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {e.stderr.decode(errors='replace')[-2000:]}\n{log[-2000:]}", pytrace=False)
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    return pg_server.create_db()
