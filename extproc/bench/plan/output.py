"""``pareto.json``, ``ranked.md`` (the readable ranked table) and ``pareto.png`` (cost vs SLO attainment)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from extproc.bench.plan.evaluate import Evaluation, bench_command
from extproc.bench.plan.pareto import pareto_front, rank_key
from extproc.bench.plan.search import SearchResult
from extproc.bench.plan.spec import Spec
from extproc.bench.workloads import Workload

SCHEMA = "extproc-plan/1"


def build(spec: Spec, workload: Workload, res: SearchResult, out_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    evs = res.evaluations
    front = set(pareto_front([(e.candidate.cost_per_hour, e.slo_attainment) for e in evs]))
    order = sorted(range(len(evs)), key=lambda i: rank_key(evs[i].slo_met, evs[i].candidate.cost_per_hour,
                                                           evs[i].slo_attainment, evs[i].violation, i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    cands = []
    for i, e in enumerate(evs):
        c = e.candidate
        cands.append({
            "id": e.id,
            "rank": rank[i],
            "pareto": i in front,
            "status": e.status,
            **({"error": e.error} if e.error else {}),
            "cost_per_hour": c.cost_per_hour,
            "slo_met": e.slo_met,
            "slo_attainment": e.slo_attainment,
            "max_slo_excess": e.violation if e.violation != float("inf") else None,
            "params": {k: _plain(v) for k, v in c.params.items()},
            "pods": {prof: n for prof, n in c.fleet},
            "fleet": e.fleet,
            "config": e.config,
            "checks": e.checks,
            "metrics": e.metrics,
            "virtual_seconds": round(e.virtual_seconds, 3),
            "wall_seconds": round(e.wall_seconds, 3),
            "bench_command": bench_command(spec, e.fleet, e.config, c.pd_prefill if c.pd_prefill else 0, False,
                                           os.path.join(os.path.abspath(out_dir), "rerun", e.id)),
        })
    feasible = [cands[i] for i in order if evs[i].slo_met]
    return {
        "schema": SCHEMA,
        **meta,
        "spec": os.path.abspath(spec.path),
        "name": spec.name,
        "seed": spec.seed,
        "method": res.method,
        "budget": spec.budget,
        "grid_size": res.grid_size,
        "valid_grid": res.valid_grid,
        "trials": res.trials,
        "evaluated": len(evs),
        "failed": sum(1 for e in evs if e.status != "ok"),
        "wall_seconds": round(res.wall_seconds, 2),
        "search": res.extra,
        "workload": {"name": workload.name, "requests": len(workload.requests), "span_s": round(workload.stages[0].duration, 3),
                     "classes": workload.params.get("classes", {}), "kv_blocks": workload.kv_blocks},
        "slos": {k: {s.key: s.target for s in v} for k, v in spec.slos.items()},
        "pareto_front": [cands[i]["id"] for i in sorted(front, key=lambda i: (evs[i].candidate.cost_per_hour, -evs[i].slo_attainment))],
        "winner": feasible[0]["id"] if feasible else None,
        "runner_up": feasible[1]["id"] if len(feasible) > 1 else None,
        "candidates": cands,
    }


def _plain(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _varying(report: dict[str, Any]) -> list[str]:
    """Parameters that differ between candidates (the table shows only these)."""
    keys = list(report["candidates"][0]["params"]) if report["candidates"] else []
    return [k for k in keys if len({json.dumps(c["params"][k]) for c in report["candidates"]}) > 1]


def _param(k: str, v: Any) -> str:
    if k == "routing" and isinstance(v, str):
        return os.path.splitext(os.path.basename(v))[0]
    return _fmt(v, 2) if isinstance(v, float) else _fmt(v)


def _short_key(k: str) -> str:
    if k.startswith("pods."):  # a profile name or path -> its short name ("mi300x-tp1" for .../llama3-70b-mi300x-tp1.yaml)
        k = os.path.splitext(os.path.basename(k[len("pods."):]))[0]
        return re.sub(r"^llama3-\d+b-", "", k)
    k = k.replace("admission.", "")
    return {"max_num_seqs": "seqs", "max_num_batched_tokens": "batched", "pd_prefill": "P/D prefill",
            "maxInflightPerPod": "inflight/pod", "queueDepthThreshold": "queue thr", "kvCacheUtilThreshold": "kv thr"}.get(k, k)


def markdown(report: dict[str, Any], top: int = 25) -> str:
    cands = sorted(report["candidates"], key=lambda c: c["rank"])
    varying = _varying(report)
    checks = [(c["class"], c["slo"]) for c in cands[0]["checks"]] if cands else []
    lines = [f"# extproc plan: {report['name']}", ""]
    valid = "" if report["valid_grid"] is None else f", {report['valid_grid']} valid"
    lines.append(f"{report['evaluated']} candidates ({report['method']}, budget {report['budget']}, grid {report['grid_size']} points"
                 f"{valid}), seed {report['seed']}, "
                 f"{report['wall_seconds']:.0f} s wall; trace {report['workload']['requests']} requests over "
                 f"{report['workload']['span_s']:.0f} s (virtual time).")
    lines.append("")
    slos = "; ".join(f"{k}: " + ", ".join(f"{s} ≤ {t:g}" if s != "success_rate" else f"success ≥ {t:g}" for s, t in v.items())
                     for k, v in report["slos"].items())
    lines.append(f"SLOs — {slos}")
    lines.append("")
    by_id = {c["id"]: c for c in cands}
    if report["winner"]:
        w = by_id[report["winner"]]
        lines.append(f"**Cheapest configuration meeting every SLO: {w['id']}** — ${w['cost_per_hour']:.2f}/h, "
                     + ", ".join(f"{_short_key(k)}={_param(k, w['params'][k])}" for k in varying) + ".")
        if report["runner_up"]:
            r = by_id[report["runner_up"]]
            lines.append(f"Runner-up: {r['id']} — ${r['cost_per_hour']:.2f}/h, "
                         + ", ".join(f"{_short_key(k)}={_param(k, r['params'][k])}" for k in varying) + ".")
    else:
        lines.append("**No evaluated configuration meets every SLO.** The closest ones rank first.")
    lines.append("")
    head = ["rank", "id", "$/h", "SLOs", "attain"] + [_short_key(k) for k in varying] + [f"{c} {s}" for c, s in checks] + ["front"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for c in cands[:top]:
        vals = {(k["class"], k["slo"]): k for k in c["checks"]}
        row = [str(c["rank"]), c["id"], f"{c['cost_per_hour']:.2f}", "met" if c["slo_met"] else ("failed" if c["status"] != "ok" else "missed"),
               f"{c['slo_attainment']:.3f}"]
        row += [_param(k, c["params"][k]) for k in varying]
        for key in checks:
            k = vals.get(key)
            if k is None or k["value"] is None:
                row.append("–")
            else:
                v = k["value"]
                row.append((f"{v:.3f}" if key[1] == "success_rate" else f"{v:.0f}") + ("" if k["met"] else " ✗"))
        row.append("●" if c["pareto"] else "")
        lines.append("| " + " | ".join(row) + " |")
    if len(cands) > top:
        lines.append(f"\n({len(cands) - top} more in pareto.json)")
    lines.append("")
    lines.append("Pareto front (cost ↑, attainment ↑): " + ", ".join(
        f"{i} (${by_id[i]['cost_per_hour']:.2f}/h, {by_id[i]['slo_attainment']:.3f})" for i in report["pareto_front"]))
    if report["winner"]:
        lines += ["", "Re-run the winner in real time on the same trace:", "", "```", by_id[report["winner"]]["bench_command"], "```"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = report["candidates"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for met, color, label in ((False, "#bbbbbb", "misses an SLO"), (True, "#1f77b4", "meets every SLO")):
        xs = [c["cost_per_hour"] for c in cands if c["slo_met"] == met]
        ys = [c["slo_attainment"] for c in cands if c["slo_met"] == met]
        if xs:
            ax.scatter(xs, ys, s=18, c=color, label=f"{label} ({len(xs)})", alpha=0.8, edgecolors="none")
    by_id = {c["id"]: c for c in cands}
    front = [by_id[i] for i in report["pareto_front"]]
    if front:
        ax.step([c["cost_per_hour"] for c in front], [c["slo_attainment"] for c in front], where="post", color="#d62728",
                lw=1.2, label="Pareto front")
    if report["winner"]:
        w = by_id[report["winner"]]
        ax.scatter([w["cost_per_hour"]], [w["slo_attainment"]], s=120, marker="*", c="#2ca02c", zorder=5,
                   label=f"cheapest meeting SLOs: {w['id']} (${w['cost_per_hour']:.2f}/h)")
    ax.set_xlabel("cost ($ per hour)")
    ax.set_ylabel("SLO attainment (mean over classes)")
    ax.set_title(f"extproc plan {report['name']}: {report['evaluated']} candidates ({report['method']}, seed {report['seed']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "pareto.json")
    with open(p, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    paths.append(p)
    p = os.path.join(out_dir, "ranked.md")
    with open(p, "w", encoding="utf-8") as f:
        f.write(markdown(report))
    paths.append(p)
    if plots and report["candidates"]:
        paths.append(plot(report, os.path.join(out_dir, "pareto.png")))
    return paths
