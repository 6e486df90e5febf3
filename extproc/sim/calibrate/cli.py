"""``extproc sim calibrate --target URL [--target URL2] --out profile.yaml [--report FILE]`` (or ``--launch``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

from extproc.sim.calibrate.driver import calibrate
from extproc.sim.calibrate.launcher import VllmLaunchSpec, real_vllm_servers
from extproc.sim.calibrate.report import render_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", default=[], help="base URL of a real vLLM server (repeatable)")
    parser.add_argument(
        "--launch",
        action="store_true",
        help="start one real vLLM CPU server on the tiny model (needs scripts/real_vllm_setup.sh) and calibrate it",
    )
    parser.add_argument("--out", required=True, help="where to write the fitted profile YAML")
    parser.add_argument(
        "--model", dest="cal_model", default=None, help="served model name (default: the server's first model)"
    )
    parser.add_argument("--name", default=None, help="profile name (default: the --out file stem)")
    parser.add_argument("--accelerator", default="cpu-1-core", help="accelerator label written in the profile")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the server's --max-num-seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's --max-num-batched-tokens")
    parser.add_argument("--report", default=None, help="write a Markdown report here")
    parser.add_argument("--seed", dest="cal_seed", type=int, default=None, help="design seed (default: random per run)")
    parser.add_argument(
        "--no-sim-correct", action="store_true", help="do not subtract the simulated pod's own serving overhead"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the held-out real-vs-simulated comparison")


async def _run(args: argparse.Namespace) -> int:
    if not args.target and not args.launch:
        print("calibrate: give --target URL (repeatable) or --launch", file=sys.stderr)
        return 2
    command = "extproc sim calibrate " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["sim", "calibrate"] else sys.argv[1:])
    async with contextlib.AsyncExitStack() as stack:
        targets = list(args.target)
        if args.launch:
            from extproc.sim.tiny_model import build_tiny_model

            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="calibrate-")))
            model_dir = build_tiny_model(wd / "tiny")
            spec = VllmLaunchSpec(
                model_dir, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
            )
            servers = await stack.enter_async_context(real_vllm_servers([spec], workdir=wd / "run"))
            print(f"launched real vLLM at {servers[0].url} in {servers[0].startup_s:.1f} s", file=sys.stderr)
            targets.append(servers[0].url)
        res = await calibrate(
            targets,
            model=args.cal_model,
            name=args.name or Path(args.out).stem,
            accelerator=args.accelerator,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            validate=not args.no_validate,
            seed=args.cal_seed,
            sim_correct=not args.no_sim_correct,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res.profile.to_yaml(args.out)
    report = render_report(res, command)
    if args.report:
        Path(args.report).write_text(report, encoding="utf-8")
    print(report)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc sim calibrate", description="fit a simulator profile from real vLLM servers")
    add_arguments(parser)
    return run(parser.parse_args(argv))
