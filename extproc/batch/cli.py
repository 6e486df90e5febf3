"""``extproc batch``: ``serve`` runs the batch service; ``status ID`` shows a job's progress."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="batch_command", metavar="ACTION")
    s = sub.add_parser("serve", help="run the OpenAI-compatible batch service (/v1/files, /v1/batches)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8090, help="HTTP port (0 = a free one; see --ready-file)")
    s.add_argument("--gateway", required=True, help="the gateway (Envoy) base URL every line is sent through, e.g. http://127.0.0.1:8081")
    s.add_argument("--store", default="./batch-data", help="a data directory (SQLite + files, the default) or postgresql://user@host:port/db")
    s.add_argument("--objective", default="batch", help="x-gateway-inference-objective of every line (default %(default)s)")
    s.add_argument("--min-concurrency", type=int, default=5)
    s.add_argument("--max-concurrency", type=int, default=100)
    s.add_argument("--initial-concurrency", type=int, default=5)
    s.add_argument("--decrease-factor", type=float, default=0.5, help="AIMD: the limit is multiplied by this on 429/503 (default %(default)s)")
    s.add_argument("--decrease-cooldown", type=float, default=0.5, help="AIMD: at most one decrease per this many seconds")
    s.add_argument("--max-retries", type=int, default=5, help="retries of a line on 5xx (other than 503) and transport errors")
    s.add_argument("--backoff", type=float, default=0.1, help="first retry delay, seconds (doubles, capped by --backoff-cap, ±50%% jitter)")
    s.add_argument("--backoff-cap", type=float, default=5.0)
    s.add_argument("--gateway-headroom", action=argparse.BooleanOptionalAction, default=True, help="size the concurrency limit from the gateway's x-gateway-batch-headroom answers (free batch slots at admission); --no-gateway-headroom: AIMD probing alone")
    s.add_argument("--lease", type=float, default=10.0, help="seconds a replica's claim on a line lasts without a heartbeat")
    s.add_argument("--max-lines", type=int, default=50_000)
    s.add_argument("--max-file-bytes", type=int, default=200 * 1024 * 1024)
    s.add_argument("--replica-id", default="", help="owner id of this replica (default: random)")
    s.add_argument("--ready-file", default=None, help="write {port, pid, owner} as JSON here when serving")
    s.add_argument("--log-level", default="info")
    st = sub.add_parser("status", help="show a batch's status and progress")
    st.add_argument("batch_id")
    st.add_argument("--url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8081").removesuffix("/v1"), help="gateway or batch-service base URL (default $OPENAI_BASE_URL)")
    st.add_argument("--watch", action="store_true", help="keep the progress bar running until the batch ends")
    st.add_argument("--json", action="store_true", help="print the batch object as JSON")
    st.add_argument("--interval", type=float, default=1.0)


def run(args: argparse.Namespace) -> int:
    if args.batch_command == "serve":
        return _serve(args)
    if args.batch_command == "status":
        return _status(args)
    print("usage: extproc batch {serve,status} ...", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from extproc.observe.logging import setup_logging

    setup_logging(args.log_level, "text")
    try:
        import uvloop

        return int(uvloop.run(_serve_async(args)))
    except ImportError:
        return int(asyncio.run(_serve_async(args)))


async def _serve_async(args: argparse.Namespace) -> int:
    from aiohttp import web

    from extproc.batch.app import build_app
    from extproc.batch.dispatch import DispatchConfig
    from extproc.batch.service import BatchService, ServiceConfig
    from extproc.batch.store import open_store

    dcfg = DispatchConfig(
        gateway=args.gateway.rstrip("/"), objective=args.objective, min_concurrency=args.min_concurrency,
        max_concurrency=args.max_concurrency, initial_concurrency=args.initial_concurrency, max_retries=args.max_retries,
        decrease_factor=args.decrease_factor, decrease_cooldown_s=args.decrease_cooldown, backoff_s=args.backoff, backoff_cap_s=args.backoff_cap,
        use_headroom=args.gateway_headroom,
    )  # fmt: skip
    cfg = ServiceConfig(dispatch=dcfg, owner=args.replica_id, lease_s=args.lease, max_lines=args.max_lines, max_file_bytes=args.max_file_bytes)
    svc = BatchService(open_store(args.store), cfg)
    await svc.start()
    runner = web.AppRunner(build_app(svc, max_body_bytes=args.max_file_bytes + 1024 * 1024), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else args.port
    log.info("batch service on %s:%d (owner %s), gateway %s, store %s", args.host, port, svc.owner, dcfg.gateway, type(svc.store).__name__)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": port, "pid": os.getpid(), "owner": svc.owner}, f)
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await svc.stop()
    return 0


def _fetch(url: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (a URL the user gave)
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            msg = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = body[:200].decode(errors="replace")
        raise SystemExit(f"batch status: {e.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"batch status: cannot reach {url}: {e}") from None


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from extproc.batch.model import TERMINAL

    url = f"{args.url.rstrip('/')}/v1/batches/{args.batch_id}"
    b = _fetch(url)
    if args.json:
        print(json.dumps(b, indent=2))
        return 0
    console = Console()

    def describe(b: dict[str, Any]) -> str:
        rc = b["request_counts"]
        return f"[bold]{b['id']}[/] {b['status']}  completed {rc['completed']}  failed {rc['failed']}"

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as prog:
        rc = b["request_counts"]
        task = prog.add_task(describe(b), total=rc["total"] or None, completed=rc["completed"] + rc["failed"])
        while args.watch and b["status"] not in TERMINAL:
            time.sleep(args.interval)
            b = _fetch(url)
            rc = b["request_counts"]
            prog.update(task, description=describe(b), total=rc["total"] or None, completed=rc["completed"] + rc["failed"])
    for k in ("output_file_id", "error_file_id"):
        if b.get(k):
            console.print(f"{k}: {b[k]}")
    if b.get("errors"):
        for e in b["errors"]["data"][:10]:
            console.print(f"  line {e.get('line')}: {e.get('code')}: {e.get('message')}")
    return 0 if b["status"] not in ("failed", "expired") else 1
