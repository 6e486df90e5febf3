"""The ``extproc`` command. Each subcommand lives in its own module that exposes
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports stay inside ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("extproc.server.cli", "run the ext_proc scheduler beside Envoy"),
    "sim": ("extproc.sim.cli", "run a simulated vLLM fleet (or calibrate a profile)"),
    "demo": ("extproc.demo", "real Envoy + simulated fleet + scheduler + a workload, with a summary"),
    "bench": ("extproc.bench.cli", "routing-quality and overhead benchmarks, side by side with peers"),
    "config": ("extproc.config_cli", "check a plugin config (llm-d EndpointPickerConfig or extproc's): resolved profiles and plugins"),
    "envoy-config": ("extproc.envoy_config", "render a validated Envoy bootstrap for extproc"),
    "predictor": ("extproc.sim.predictor_cli", "train / evaluate the TTFT/TPOT latency predictor"),
    "pd-sidecar": ("extproc.sidecar.cli", "decode-side P/D proxy: prefill leg on x-prefiller-host-port, then local decode"),
    "plan": ("extproc.bench.plan.cli", "capacity planning: search deployments in virtual time, rank the Pareto-optimal ones"),
    "batch": ("extproc.batch.cli", "the OpenAI Batch API beside the gateway (serve, status)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="Envoy ext_proc scheduler for LLM inference")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # subcommand not built in this tree
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from extproc import __version__

        print(__version__)
        return 0
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    rc = args._module.run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
