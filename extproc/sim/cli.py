"""``extproc sim``: run a simulated vLLM fleet until SIGTERM/SIGINT; ``extproc sim calibrate ...`` fits a profile
to a real vLLM server; ``extproc sim validate SPEC --out DIR`` / ``extproc sim fit SPEC --out FILE`` check and fit
the roofline step model against measured runs (extproc.sim.fidelity).

When the fleet is up it prints one JSON line on stdout::

    {"endpoints": [...], "labels": {addr: {"accelerator": ...}}, "kv_events": {addr: {"endpoint", "replay", "topic"}}}
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

__all__ = ["add_arguments", "run"]


def _calibrate_module() -> ModuleType | None:
    try:
        return importlib.import_module("extproc.sim.calibrate")
    except ModuleNotFoundError as e:
        if e.name == "extproc.sim.calibrate":
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=4, help="number of pods (ignored with --fleet)")
    parser.add_argument("--base-port", type=int, default=0, help="first port; 0 = free ports")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--profile", default="llama3-8b-h100", help="profile name or YAML path")
    group.add_argument("--fleet", default=None, help="heterogeneous fleet: NAME:COUNT,NAME:COUNT")
    parser.add_argument("--model", default="sim-llama", help="served model name")
    parser.add_argument("--lora", default="", help="comma-separated LoRA adapter names served by every pod")
    parser.add_argument("--kv-events", action="store_true", help="publish vLLM KV events over ZMQ")
    parser.add_argument("--kv-events-array", action="store_true", help="older array encoding of KV events")
    parser.add_argument("--kv-events-connect", default=None, metavar="ENDPOINT",
                        help="publish KV events to this endpoint (a scheduler bound there: extproc serve --kv-events-bind, "
                        "llm-d's zmqEndpoint) instead of binding one per pod; implies --kv-events")
    parser.add_argument("--kv-blocks", type=int, default=None, help="override num_gpu_blocks of every profile")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every simulated duration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pd-prefill", type=int, default=0,
                        help="P/D fleet: the first N pods are prefill-role, the rest decode-role (NixlConnector on all)")
    parser.add_argument("--link", default="rdma-400g", help="P/D KV-transfer link profile: rdma-400g | tcp-25g")
    parser.add_argument("--kv-failure-rate", type=float, default=0.0, help="P/D: probability a KV transfer fails")
    parser.add_argument("--kv-load-failure-policy", choices=["fail", "recompute"], default="fail",
                        help="P/D: what a decode pod does when a KV transfer fails (vLLM KVTransferConfig)")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=False)
    from extproc.sim import fidelity_args

    fidelity_args.add_validate_arguments(
        sub.add_parser("validate", help="simulate a SPEC of measured runs; report.json + plot of predicted vs measured")
    )
    fidelity_args.add_fit_arguments(sub.add_parser("fit", help="fit the roofline step model's coefficients on a SPEC"))
    cal = sub.add_parser("calibrate", help="fit a profile's coefficients from a real vLLM server")
    mod = _calibrate_module()
    if mod is not None:
        mod.add_arguments(cal)
    else:
        cal.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "sim_command", None) in ("validate", "fit"):
        from extproc.sim import fidelity

        return fidelity.run_validate(args) if args.sim_command == "validate" else fidelity.run_fit(args)
    if getattr(args, "sim_command", None) == "calibrate":
        mod = _calibrate_module()
        if mod is None:
            print("extproc sim calibrate: extproc.sim.calibrate is not available in this build", file=sys.stderr)
            return 2
        return int(mod.run(args) or 0)

    import asyncio
    import json
    import logging
    import signal

    import uvloop

    from extproc.sim.fleet import FleetSpec, SimFleet

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING), stream=sys.stderr)
    try:
        spec = FleetSpec(
            pods=args.pods,
            profile=args.profile,
            fleet=args.fleet,
            model=args.model,
            loras=tuple(x.strip() for x in args.lora.split(",") if x.strip()),
            kv_events=args.kv_events or args.kv_events_array or bool(args.kv_events_connect),
            kv_events_connect=args.kv_events_connect,
            kv_blocks=args.kv_blocks,
            base_port=args.base_port,
            seed=args.seed,
            time_scale=args.time_scale,
            kv_events_array_encoding=args.kv_events_array,
            prefill_pods=args.pd_prefill,
            link=args.link,
            kv_failure_rate=args.kv_failure_rate,
            kv_load_failure_policy=args.kv_load_failure_policy,
        )
        spec.roles(len(spec.profiles()))
        from extproc.sim.kvtransfer import get_link

        get_link(spec.link)
    except (KeyError, ValueError) as e:
        print(f"extproc sim: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        fleet = SimFleet(spec)
        try:
            await fleet.start()
            line = {"endpoints": fleet.endpoints, "labels": fleet.labels, "kv_events": fleet.kv_events}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            await fleet.stop()
        return 0

    return uvloop.run(main())
