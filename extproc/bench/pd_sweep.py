"""``extproc bench --virtual --workload pd --pd-sweep 0,16,256,1024``: the prefix-based P/D decider's threshold.

For each ``nonCachedTokens`` value the shipped ``pd`` config is run with that threshold (same trace, same split
fleet, cold caches), beside ``extproc-default`` on the aggregated fleet. 0 turns P/D off (every request is
prefilled on its decode pod; the prefill pods idle); larger values keep requests whose prompt is mostly cached on
the decode pod local. Writes ``pd_sweep.json`` and ``pd_sweep.png`` (TTFT / TPOT / E2E p50 and the split share
per threshold, all stages together).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from extproc.bench.report import RequestResult, percentile
from extproc.bench.setups import SETUPS, SetupSpec
from extproc.scheduling.config import builtin_config_path


def sweep_config(out_dir: str, threshold: int) -> str:
    with open(builtin_config_path("pd"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    for p in raw["plugins"]:
        if p.get("type") == "prefix-based-pd-decider":
            p.setdefault("parameters", {})["nonCachedTokens"] = threshold
    path = os.path.join(out_dir, f"pd-nc{threshold}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def summarize(results: list[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]

    def p(vals: list[float], q: float) -> float | None:
        return round(percentile(vals, q), 2) if vals else None

    ttft = [r.ttft_ms for r in ok]
    tpot = [r.tpot_ms for r in ok if r.output_tokens > 1]
    e2e = [r.e2e_ms for r in ok]
    return {
        "requests": len(results), "ok": len(ok),
        "split_share": round(sum(1 for r in ok if r.prefill_pod) / len(ok), 4) if ok else None,
        "ttft_ms": {"p50": p(ttft, 50), "p90": p(ttft, 90), "mean": round(sum(ttft) / len(ttft), 2) if ttft else None},
        "tpot_ms": {"p50": p(tpot, 50), "p90": p(tpot, 90)},
        "e2e_ms": {"p50": p(e2e, 50), "p90": p(e2e, 90)},
    }  # fmt: skip


def run_sweep(workload: Any, fleet: Any, thresholds: list[int], out_dir: str, *, seed: int, pd_prefill: int,
              show_progress: bool = False) -> dict[str, Any]:
    from extproc.bench import virtual

    os.makedirs(out_dir, exist_ok=True)
    setups: list[SetupSpec] = [SETUPS["extproc-default"]]
    for t in thresholds:
        setups.append(SetupSpec(f"extproc-pd-nc{t}", "extproc", config=sweep_config(out_dir, t), pd=True))
    runs = virtual.run_setups(workload, setups, fleet, seed=seed, show_progress=show_progress, pd_prefill=pd_prefill)
    rows: dict[str, Any] = {}
    for s, run in zip(setups, runs):
        if run.status != "ok" or run.results is None:
            rows[s.name] = {"status": run.status, "reason": run.reason}
            continue
        rows[s.name] = {"status": "ok", **summarize(run.results)}
    out = {"workload": workload.name, "seed": seed, "fleet": [p for p, _ in fleet.pods], "pd_prefill": pd_prefill,
           "thresholds": thresholds, "stages": [{"rate": st.rate, "duration_s": st.duration} for st in workload.stages],
           "setups": rows}
    with open(os.path.join(out_dir, "pd_sweep.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    _plot(out, os.path.join(out_dir, "pd_sweep.png"))
    return out


def _plot(rep: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = rep["thresholds"]
    rows = [rep["setups"].get(f"extproc-pd-nc{t}", {}) for t in ts]
    agg = rep["setups"].get("extproc-default", {})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    xs = list(range(len(ts)))
    for ax, (key, label) in zip(axes, (("ttft_ms", "TTFT p50 (ms)"), ("tpot_ms", "TPOT p50 (ms)"), ("e2e_ms", "E2E p50 (ms)"))):
        ys = [r.get(key, {}).get("p50") if r.get("status") == "ok" else None for r in rows]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label="extproc-pd")
        if agg.get("status") == "ok":
            ax.axhline(agg[key]["p50"], color="gray", linestyle="--", label="extproc-default (aggregated)")
        ax.set_xticks(xs, [str(t) for t in ts])
        ax.set_xlabel("prefix-based-pd-decider nonCachedTokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax2 = ax.twinx()
        ax2.bar(xs, [r.get("split_share") or 0 for r in rows], alpha=0.15, color="tab:green")
        ax2.set_ylim(0, 1)
        if key == "e2e_ms":
            ax2.set_ylabel("share of requests split (bars)")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"P/D decider threshold sweep — {rep['workload']}, {len(rep['fleet'])} pods ({rep['pd_prefill']} prefill), virtual time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
