"""Command-line arguments of ``extproc sim validate`` / ``extproc sim fit`` (kept apart from extproc.sim.fidelity
so building the ``extproc`` parser does not import numpy and the engine)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_FREE", "add_validate_arguments", "add_fit_arguments"]

# the coefficients a fit moves by default (the others keep their prior value)
# tp_hop stays at its physics prior (the GPU table's per-hop latency): a fit on one multi-GPU TP degree cannot
# separate it from the weights and per-step terms
DEFAULT_FREE: tuple[str, ...] = ("weights", "kv", "compute", "step_us", "ingress_ms")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="SPEC YAML (see extproc.sim.fidelity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-stage-seconds", type=float, default=None,
                   help="simulate at most this many seconds of each stage (default: the whole stage)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="schedule arrivals into the next step (vLLM without async scheduling)")
    p.add_argument("--architectures", default=None, help="extra architecture table (YAML)")
    p.add_argument("--gpus", default=None, help="extra GPU table (YAML)")


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--out", required=True, help="output directory (report.json, report.png)")
    p.add_argument("--coefficients", default=None,
                   help="roofline coefficients or profile YAML (default: the shipped fit)")


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--out", required=True, help="output coefficients YAML")
    p.add_argument("--start", default=None, help="starting/prior coefficients YAML (default: the physics prior)")
    p.add_argument("--free", default=",".join(DEFAULT_FREE), help="comma-separated coefficients to fit")
    p.add_argument("--metrics", default="ttft_mean,e2e_mean,itl_mean", help="metrics the fit matches")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--prior-weight", type=float, default=0.05)
    p.set_defaults(max_stage_seconds=150.0)
