"""``extproc bench``: routing quality side by side with Envoy's load balancers and peer routers, and
``extproc bench overhead``: what the scheduler costs on the request path.

```
extproc bench --workload shared-prefix --fleet 8 --setups envoy-rr,extproc-default --out out/ [--virtual]
extproc bench overhead --pods 8 --duration 3
```
"""

from __future__ import annotations

import argparse
import json
import datetime as _dt
import logging
import sys

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", choices=["run", "overhead"], default="run",
                   help="'run' (default): routing-quality benchmark; 'overhead': proxy + scheduler cost")
    p.add_argument("--workload", default="shared-prefix",
                   help="shared-prefix | multi-turn | multi-lora | heterogeneous | three-vendor | long-prompts | bursty")
    p.add_argument("--workload-spec", default=None, metavar="SPEC",
                   help="build the trace from the workload and SLOs of an `extproc plan` SPEC (same seed -> the same trace "
                        "the plan evaluated); the report gets per-class SLO results. Replaces --workload/--stages")
    p.add_argument("--fleet", default=None,
                   help="N pods of llama3-8b-h100, or profile:N,profile:M (default: the workload's fleet, else 8)")
    p.add_argument("--setups", default=None,
                   help="comma list of setups, or 'all' (default: envoy-rr,envoy-lr,extproc-random,extproc-default,extproc-prefix-load)")
    p.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even when a setup named in --setups could not run (its binary or package is missing); "
                   "without it such a run exits 1 (setups from 'all' or the default list may always be skipped)")
    p.add_argument("--out", default="bench-out", help="output directory for report.json, report.md and plots")
    p.add_argument("--seed", type=int, default=0, help="trace and simulator seed (same seed → same trace)")
    p.add_argument("--stages", default=None, help="RATE:SECONDS,... Poisson stages (default: the workload's)")
    p.add_argument("--virtual", action="store_true", help="virtual time: scheduler plugins drive the engine model, no sockets")
    p.add_argument("--repeat", type=int, default=1, help="real time: run every setup N times, order rotated each round")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated pods run this many times slower than the profile (fits real-time load to this machine)")
    p.add_argument("--kv-blocks", type=int, default=None, help="per-pod KV blocks (default: what the workload is sized for)")
    p.add_argument("--pd-prefill", type=int, default=None,
                   help="P/D setups: prefill-role pods of the fleet (default: the workload's, else half)")
    p.add_argument("--link", default="rdma-400g", help="P/D: KV-transfer link profile (rdma-400g | tcp-25g)")
    p.add_argument("--kv-failure-rate", type=float, default=0.0, help="P/D: probability that a KV transfer fails")
    p.add_argument("--kv-load-failure-policy", choices=["fail", "recompute"], default="fail",
                   help="P/D: decode pods' vLLM kv_load_failure_policy")
    p.add_argument("--warm-start", default=None, metavar="FILE",
                   help="start predictor configs from this latency-model file ('builtin': the packaged one); default: cold, learned online")
    p.add_argument("--non-streaming", action="store_true", help="send every request without 'stream' (default: streaming)")
    p.add_argument("--pd-sweep", default=None, metavar="T,T,...",
                   help="virtual: sweep prefix-based-pd-decider nonCachedTokens over these values (e.g. 0,16,256,1024) "
                        "instead of --setups; writes pd_sweep.json and pd_sweep.png")
    p.add_argument("--replicas", default="1", metavar="N[,N...]",
                   help="real time: run every extproc setup with N active-active scheduler replicas behind Envoy (a "
                        "comma list runs each count side by side: 1,2,3 → name, name@r2, name@r3; Redis-shared state)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--aiperf", action="store_true",
                   help="real time: also run aiperf (scripts/aiperf_setup.sh) and our client at one fixed-concurrency load per setup")
    p.add_argument("--aiperf-load", default="8:200:128:32",
                   help="--aiperf load CONCURRENCY:REQUESTS:ISL:OSL (default 8:200:128:32)")
    # overhead
    p.add_argument("--pods", default="8", help="overhead: pods behind Envoy, a count or a comma list (8,64,512)")
    p.add_argument("--duration", type=float, default=3.0, help="overhead: seconds per measurement")
    p.add_argument("--connections", default="1,16", help="overhead: client connection counts")
    p.add_argument("--decision-pods", default="8,32,128,512", help="overhead: pod counts for in-process decision latency")
    p.add_argument("--rounds", type=int, default=2, help="overhead: interleaved rounds (order rotated each round)")
    p.add_argument("--upstream", choices=["fake", "sim"], default="fake", help="overhead: fake = Envoy direct_response pods; sim = the Python simulator")
    p.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto", help="overhead: load generator (auto: wrk if installed)")
    p.add_argument("--observe", default="observability,none", help="overhead: extproc --response-observe modes to compare")
    p.add_argument("--variants", default="", help="overhead: extra scheduler variants (observability-grpcio, none-grpcio, ...)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.mode == "overhead":
        from extproc.bench.overhead import run_overhead

        from extproc.bench.overhead import parse_pods

        return run_overhead(
            pods=parse_pods(args.pods),
            duration=args.duration,
            connections=[int(c) for c in args.connections.split(",") if c.strip()],
            decision_pods=[int(c) for c in args.decision_pods.split(",") if c.strip()],
            out_dir=args.out,
            rounds=args.rounds,
            upstream=args.upstream,
            client=args.client,
            observe=[m for m in args.observe.split(",") if m],
            variants=[v for v in args.variants.split(",") if v],
        )
    return run_bench(args)


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from extproc.bench import report as rep
    from extproc.bench.setups import DEFAULT_SETUPS, parse_setups, with_replicas
    from extproc.bench.workloads import generate, parse_stages

    plan_spec = None
    try:
        setups = parse_setups(args.setups or ",".join(DEFAULT_SETUPS))
        replica_counts = [int(x) for x in str(getattr(args, "replicas", "1")).split(",") if x.strip()]
        setups = with_replicas(setups, replica_counts)
        if args.virtual and any(s.replicas > 1 for s in setups):
            raise ValueError("--replicas > 1 needs real time (drop --virtual): replicas are processes sharing state over Redis")
        if getattr(args, "workload_spec", None):
            from extproc.bench.plan.spec import load_spec
            from extproc.bench.plan.traffic import build_workload

            if args.stages:
                raise ValueError("--stages does not apply with --workload-spec (the SPEC's classes have their own)")
            plan_spec = load_spec(args.workload_spec)
            wl = build_workload(plan_spec)
        else:
            stages = parse_stages(args.stages) if args.stages else None
            wl = generate(args.workload, stages, seed=args.seed)
    except ValueError as e:
        print(f"extproc bench: {e}", file=sys.stderr)
        return 2
    if args.repeat < 1 or args.time_scale <= 0:
        print("extproc bench: --repeat must be >= 1 and --time-scale > 0", file=sys.stderr)
        return 2
    if getattr(args, "aiperf", False):
        from extproc.bench.aiperf import FixedLoad

        try:
            c, n, isl, osl = (int(x) for x in args.aiperf_load.split(":"))
            aiperf_load = FixedLoad(concurrency=c, requests=n, isl=isl, osl=osl)
            aiperf_load.validate()
        except ValueError as e:
            print(f"extproc bench: bad --aiperf-load {args.aiperf_load!r}: {e}", file=sys.stderr)
            return 2
        if args.virtual:
            print("extproc bench: --aiperf needs real time (drop --virtual)", file=sys.stderr)
            return 2
    fleet = args.fleet or wl.fleet or "8"
    kv_blocks = args.kv_blocks if args.kv_blocks is not None else wl.kv_blocks
    pd_prefill = args.pd_prefill if args.pd_prefill is not None else wl.pd_prefill
    meta = {
        "workload": wl.name,
        "seed": args.seed,
        "virtual": bool(args.virtual),
        "fleet": fleet,
        "kv_blocks": kv_blocks,
        "loras": list(wl.loras),
        "time_scale": args.time_scale,
        "repeat": args.repeat if not args.virtual else 1,
        "workload_params": wl.params,
        "total_requests": len(wl.requests),
        "pd": {"prefill_pods": pd_prefill, "link": args.link, "kv_failure_rate": args.kv_failure_rate,
               "kv_load_failure_policy": args.kv_load_failure_policy} if any(s.pd for s in setups) else None,
        "warm_start": args.warm_start,
        "streaming": not args.non_streaming,
        "replicas": sorted({s.replicas for s in setups if s.kind == "extproc"}) or [1],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.virtual:
        from extproc.bench import virtual

        try:
            fl = virtual.layout(fleet, kv_blocks, wl.loras, args.time_scale, args.link, args.kv_failure_rate, args.kv_load_failure_policy)
        except (ValueError, KeyError) as e:
            print(f"extproc bench: bad --fleet: {e}", file=sys.stderr)
            return 2
        if args.pd_sweep:
            from extproc.bench.pd_sweep import run_sweep

            try:
                ts = [int(x) for x in args.pd_sweep.split(",") if x.strip()]
            except ValueError:
                print(f"extproc bench: bad --pd-sweep {args.pd_sweep!r}", file=sys.stderr)
                return 2
            rep_ = run_sweep(wl, fl, ts, args.out, seed=args.seed, pd_prefill=pd_prefill, show_progress=not args.no_progress)
            print(json.dumps(rep_["setups"], indent=1))
            print(f"wrote {args.out}/pd_sweep.json, {args.out}/pd_sweep.png")
            return 0 if all(r.get("status") == "ok" for r in rep_["setups"].values()) else 1
        runs = virtual.run_setups(wl, setups, fl, seed=args.seed, show_progress=not args.no_progress,
                                  warm_start=args.warm_start, stream=not args.non_streaming, pd_prefill=pd_prefill)
    else:
        from extproc.bench import runner

        fo = runner.FleetOptions(fleet, kv_blocks, wl.loras, args.time_scale, args.seed, args.warm_start, not args.non_streaming,
                                 pd_prefill, args.link, args.kv_failure_rate, args.kv_load_failure_policy)
        runs = asyncio.run(runner.run_setups(wl, setups, fo, args.out, repeat=args.repeat, show_progress=not args.no_progress))
    report = rep.build_report(meta, [(s.rate, s.duration) for s in wl.stages], runs)
    if plan_spec is not None:
        from extproc.bench.plan.evaluate import class_metrics

        report["workload_spec"] = args.workload_spec
        for r in runs:
            if r.status == "ok" and r.results is not None and r.name in report["setups"]:
                report["setups"][r.name]["classes"] = class_metrics(plan_spec, wl, r.results, repeats=max(1, r.repeats))
    if getattr(args, "aiperf", False):
        from extproc.bench import aiperf

        ok_setups = [s for s in setups if any(r.name == s.name and r.status == "ok" for r in runs)]
        aiperf.attach(report, asyncio.run(aiperf.cross_check_setups(ok_setups, fo, args.out, aiperf_load)))
    problems = rep.validate_report(report)
    paths = rep.write_outputs(args.out, report, runs, plots=not args.no_plots)
    print(rep.markdown(report))
    print("wrote " + ", ".join(paths))
    if problems:
        print("report problems: " + "; ".join(problems), file=sys.stderr)
        return 1
    named = explicitly_named(args.setups)
    missing = [r for r in runs if r.status == "skipped" and r.name.split("@", 1)[0] in named]
    if missing and not getattr(args, "allow_skipped", False):
        for r in missing:
            print(f"setup {r.name} was asked for but did not run: {r.reason} (--allow-skipped to accept)", file=sys.stderr)
        return 1
    return 0 if any(r.status == "ok" for r in runs) else 1


def explicitly_named(setups_arg: str | None) -> set[str]:
    """The setups a user named in ``--setups`` (not those that ``all`` or the default list bring)."""
    if not setups_arg:
        return set()
    return {x.strip() for x in setups_arg.split(",") if x.strip() and x.strip() != "all"}
