"""``extproc pd-sidecar --listen HOST:PORT --upstream HOST:PORT``: the decode-side P/D proxy.

``--listen``/``--upstream`` may be repeated (matched in order) to run several sidecars in one process (the
benchmarks do; a Kubernetes pod runs one). When every sidecar is up it prints one JSON line on stdout::

    {"sidecars": [{"listen": "127.0.0.1:40001", "upstream": "127.0.0.1:8200"}, ...]}
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", required=True, help="HOST:PORT the sidecar serves (port 0 = free)")
    p.add_argument("--upstream", action="append", required=True, help="HOST:PORT of the local decode vLLM")
    p.add_argument("--on-prefill-failure", choices=["fallback", "error"], default="fallback",
                   help="prefill leg failed (5xx/connection/timeout): prefill locally on the decode pod (default) or answer 502")
    p.add_argument("--prefill-timeout", type=float, default=300.0, help="seconds for the prefill leg")
    p.add_argument("--prefill-retries", type=int, default=0, help="extra tries of the prefill leg on 502/503/504 or connection errors")
    p.add_argument("--allow-prefill", default="", help="comma list of allowed prefill targets (host:port, IP or CIDR); empty = any")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--log-format", choices=["json", "text"], default="json")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import signal

    import uvloop

    from extproc.netutil import parse_host_port
    from extproc.observe.logging import setup_logging
    from extproc.sidecar.pd import PDSidecar, SidecarSettings

    setup_logging(args.log_level, args.log_format)
    if len(args.listen) != len(args.upstream):
        print("extproc pd-sidecar: give one --upstream per --listen", file=sys.stderr)
        return 2
    try:
        pairs = [(parse_host_port(a), parse_host_port(b)) for a, b in zip(args.listen, args.upstream)]
        settings = SidecarSettings(
            on_prefill_failure=args.on_prefill_failure,
            prefill_timeout_s=args.prefill_timeout,
            prefill_retries=args.prefill_retries,
            allow=tuple(x for x in args.allow_prefill.split(",") if x.strip()),
        )
    except ValueError as e:
        print(f"extproc pd-sidecar: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        cars = [PDSidecar(lst, up, settings) for lst, up in pairs]
        try:
            for c in cars:
                await c.start()
            sys.stdout.write(json.dumps({"sidecars": [{"listen": c.address, "upstream": str(c.upstream)} for c in cars]}) + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            for c in cars:
                await c.stop()
        return 0

    return uvloop.run(main())
