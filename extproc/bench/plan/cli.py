"""``extproc plan SPEC --out DIR``: capacity planning and policy search on the virtual fleet.

Reads the SPEC (workload, SLOs per class, search space, budget; see ``extproc.bench.plan.spec``), evaluates the
candidates in virtual time with our scheduler plugins (grid, Optuna or random search) and writes
``DIR/pareto.json``, ``DIR/ranked.md`` and ``DIR/pareto.png``. docs/plan.md has the design and how far to trust it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the plan SPEC (YAML)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (pareto.json, ranked.md, pareto.png, configs/, profiles/)")
    p.add_argument("--budget", type=int, default=None, help="override the SPEC's budget (candidates to evaluate)")
    p.add_argument("--method", choices=["auto", "grid", "optuna", "random"], default=None, help="override the SPEC's method")
    p.add_argument("--seed", type=int, default=None, help="override the SPEC's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip pareto.png")
    p.add_argument("--top", type=int, default=15, help="rows of the ranked table printed (ranked.md has 25)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from extproc.bench.plan import output
    from extproc.bench.plan.evaluate import Materializer
    from extproc.bench.plan.search import run_search
    from extproc.bench.plan.spec import METHODS, SpecError, load_spec
    from extproc.bench.plan.traffic import build_workload

    try:
        spec = load_spec(args.spec)
        if args.budget is not None:
            if args.budget < 1:
                raise SpecError(args.spec, "--budget", f"must be >= 1, got {args.budget}")
            spec.budget = args.budget
        if args.method is not None:
            assert args.method in METHODS
            spec.method = args.method
        if args.seed is not None:
            if args.seed < 0:
                raise SpecError(args.spec, "--seed", f"must be >= 0, got {args.seed}")
            spec.seed = args.seed
        wl = build_workload(spec)
    except (SpecError, ValueError) as e:
        print(f"extproc plan: {e}", file=sys.stderr)
        return 2
    mat = Materializer(spec, args.out)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    best: dict[str, str] = {"text": "no candidate meets the SLOs yet"}
    cheapest = [float("inf")]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[best]}"), disable=args.no_progress) as prog:
        from extproc.bench.plan.search import choose_method, count_valid

        valid = count_valid(spec)
        method = choose_method(spec, valid)
        total = spec.budget if valid is None else min(spec.budget, valid)
        task = prog.add_task(f"[plan {method}]", total=total, best=best["text"])

        def on_result(ev, n):  # type: ignore[no-untyped-def]
            if ev.slo_met and ev.candidate.cost_per_hour < cheapest[0]:
                cheapest[0] = ev.candidate.cost_per_hour
                best["text"] = f"cheapest meeting SLOs: {ev.id} ${ev.candidate.cost_per_hour:.2f}/h"
            prog.update(task, completed=n, best=best["text"])

        try:
            res = run_search(spec, wl, mat, on_result)
        except SpecError as e:
            print(f"extproc plan: {e}", file=sys.stderr)
            return 2
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "mode": "virtual time (extproc.bench.virtual: our scheduler plugins, the simulator's engine model)",
    }
    report = output.build(spec, wl, res, args.out, meta)
    paths = output.write(report, args.out, plots=not args.no_plots)
    md = output.markdown(report, top=args.top)
    print(md)
    print("wrote " + ", ".join(paths))
    if not res.evaluations:
        return 1
    return 0 if all(e.status == "ok" for e in res.evaluations) else 1
