"""Re-run the top candidates of an ``extproc plan`` output in real time and check that their order holds.

For the winner and the runner-up (``--top N``: the first N feasible candidates by rank), run the candidate's
``bench_command`` from ``pareto.json`` — ``extproc bench --workload-spec SPEC ...``: the same trace, real Envoy +
``extproc serve`` + the simulated fleet in wall-clock time — read the per-class SLO results of its report and rank
the candidates again with the plan's own ranking (``extproc.bench.plan.pareto.rank_key``) on the real-time numbers.
Writes ``DIR/rerun.json`` with the virtual and real-time numbers side by side and prints a table.

    flock /work/bench.lock .venv/bin/python benchmarks/plan_rerun.py out/plan [--top 2] [--extra "--no-plots"]

Real-time numbers on a shared 2-core machine carry the proxy's and the machine's noise (see docs/plan.md);
the script records the load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from extproc.bench.plan.pareto import rank_key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="an extproc plan --out directory (pareto.json)")
    ap.add_argument("--top", type=int, default=2, help="how many of the best feasible candidates to re-run (default 2)")
    ap.add_argument("--extra", default="--no-progress", help="extra extproc bench arguments")
    ap.add_argument("--extproc", default=os.path.join(os.path.dirname(sys.executable), "extproc"), help="the extproc command")
    args = ap.parse_args()
    rep = json.load(open(os.path.join(args.dir, "pareto.json"), encoding="utf-8"))
    cands = sorted((c for c in rep["candidates"] if c["slo_met"]), key=lambda c: c["rank"])[: args.top]
    if len(cands) < 2:
        print("fewer than two feasible candidates: nothing to order", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    for c in cands:
        argv = shlex.split(c["bench_command"])
        argv[0] = args.extproc
        argv += shlex.split(args.extra)
        out = argv[argv.index("--out") + 1]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        print("+ " + " ".join(argv), flush=True)
        rc = subprocess.run(argv, stdout=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        real = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
        (setup,) = real["setups"].values()
        m = setup.get("classes") or {}
        viol = [chk["value"] / chk["target"] - 1 if chk["slo"] != "success_rate" else (chk["target"] - chk["value"]) / max(chk["target"], 1e-9)
                for chk in m.get("checks", []) if chk["value"] is not None]
        rows.append({
            "id": c["id"], "plan_rank": c["rank"], "cost_per_hour": c["cost_per_hour"], "fleet": c["fleet"], "rc": rc,
            "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1],
            "virtual": {"slo_met": c["slo_met"], "slo_attainment": c["slo_attainment"], "checks": c["checks"]},
            "real": {"slo_met": m.get("slo_met"), "slo_attainment": m.get("slo_attainment"), "checks": m.get("checks"),
                     "max_slo_excess": max(viol) if viol else None},
        })
    def key(i: int, side: str) -> Any:
        r = rows[i]
        s = r[side]
        exc = s.get("max_slo_excess") if side == "real" else cands[i]["max_slo_excess"]
        return rank_key(bool(s["slo_met"]), r["cost_per_hour"], float(s["slo_attainment"] or 0.0),
                        exc if exc is not None else math.inf, i)
    virtual_order = sorted(range(len(rows)), key=lambda i: key(i, "virtual"))
    real_order = sorted(range(len(rows)), key=lambda i: key(i, "real"))
    result = {"plan": os.path.abspath(args.dir), "candidates": rows,
              "virtual_order": [rows[i]["id"] for i in virtual_order], "real_order": [rows[i]["id"] for i in real_order],
              "order_preserved": virtual_order == real_order}
    with open(os.path.join(args.dir, "rerun.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"\n| id | $/h | virtual: SLOs, attainment | real time: SLOs, attainment | " +
          " | ".join(f"{k['class']} {k['slo']} v / rt" for k in rows[0]["virtual"]["checks"]) + " |")
    print("|---|---|---|---|" + "---|" * len(rows[0]["virtual"]["checks"]))
    for r in rows:
        rt = {(k["class"], k["slo"]): k for k in r["real"]["checks"] or []}
        cells = []
        for k in r["virtual"]["checks"]:
            q = rt.get((k["class"], k["slo"]), {})
            cells.append(f"{k['value']:.3g} / {q.get('value', float('nan')):.3g}")
        print(f"| {r['id']} | {r['cost_per_hour']:.2f} | {'met' if r['virtual']['slo_met'] else 'missed'}, {r['virtual']['slo_attainment']:.3f} | "
              f"{'met' if r['real']['slo_met'] else 'missed'}, {r['real']['slo_attainment']:.3f} | " + " | ".join(cells) + " |")
    print(f"\nvirtual order {result['virtual_order']}, real-time order {result['real_order']}: "
          f"{'preserved' if result['order_preserved'] else 'NOT preserved'}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
