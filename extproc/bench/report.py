"""Per-stage summaries, ``report.json`` / ``report.md`` and the PNG plots.

Percentiles use linear interpolation between closest ranks (numpy's default, the same as vLLM's ``bench serve``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SCHEMA = "extproc-bench/1"


@dataclass(slots=True)
class RequestResult:
    """What one request did, as seen by the client (real time) or the event loop (virtual time)."""

    index: int
    stage: int
    start: float  # seconds since the run start, when the request was sent
    ok: bool
    status: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    output_tokens: int = 0
    pod: str = ""
    error: str = ""
    prefill_pod: str = ""  # P/D: the pod that ran the prefill leg ("" = local prefill)
    prefill_ms: float = -1.0  # P/D, real time: the sidecar's prefill-leg time (x-pd-prefill-ms; -1 = not reported)

    @property
    def tpot_ms(self) -> float:
        if self.output_tokens > 1 and self.e2e_ms > self.ttft_ms:
            return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)
        return 0.0

    @property
    def end(self) -> float:
        return self.start + self.e2e_ms / 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    n = len(values)
    if n == 0:
        return math.nan
    xs = sorted(values)
    if n == 1:
        return float(xs[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def _dist(values: Sequence[float], keys: Iterable[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in keys:
        if not values:
            out[k] = None
        elif k == "mean":
            out[k] = round(sum(values) / len(values), 3)
        else:
            out[k] = round(percentile(values, float(k[1:])), 3)
    return out


def summarize_stage(
    results: Sequence[RequestResult],
    *,
    stage: int,
    offered_rate: float,
    stage_start: float,
    stage_duration: float,
    prefix_hits: float | None = None,
    prefix_queries: float | None = None,
) -> dict[str, Any]:
    """One stage's numbers. Throughput counts the stage's requests' output tokens over the stage's wall span
    (from its start to the later of its end and its last completion)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_ms for r in ok]
    tpot = [r.tpot_ms for r in ok if r.output_tokens > 1]
    e2e = [r.e2e_ms for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    end = max([stage_start + stage_duration] + [r.end for r in ok])
    span = max(end - stage_start, 1e-9)
    hit_rate: float | None = None
    if prefix_hits is not None and prefix_queries:
        hit_rate = round(prefix_hits / prefix_queries, 4)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status) if r.status else (r.error.split(":", 1)[0] or "error")
            errors[key] = errors.get(key, 0) + 1
    return {
        "stage": stage,
        "offered_rate": offered_rate,
        "duration_s": stage_duration,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "success_rate": round(len(ok) / len(results), 4) if results else None,
        "achieved_rate": round(len(ok) / span, 3),
        "ttft_ms": _dist(ttft, ("p50", "p90", "p99", "mean")),
        "tpot_ms": _dist(tpot, ("p50", "p90")),
        "e2e_ms": _dist(e2e, ("p50", "p90")),
        "output_tok_s": round(out_tokens / span, 2),
        "output_tokens": out_tokens,
        "prefix_hit_rate": hit_rate,
        "prefix_cache_queries": prefix_queries,
        "prefix_cache_hits": prefix_hits,
        "errors": errors,
        **({"prefill_split": sum(1 for r in ok if r.prefill_pod)} if any(r.prefill_pod for r in ok) else {}),
        # where a split request's TTFT goes: the prefill leg as the sidecar timed it, and the rest (scheduling,
        # hops, KV transfer, the decode pod's first step)
        **({"prefill_leg_ms": _dist([r.prefill_ms for r in ok if r.prefill_ms >= 0], ("p50", "p90")),
            "ttft_after_prefill_ms": _dist([r.ttft_ms - r.prefill_ms for r in ok if r.prefill_ms >= 0], ("p50", "p90"))}
           if any(r.prefill_ms >= 0 for r in ok) else {}),
    }


@dataclass(slots=True)
class SetupRun:
    """Everything one setup produced: per-stage results, per-stage prefix counters, and its status."""

    name: str
    status: str  # "ok" | "skipped" | "failed"
    reason: str = ""
    config: dict[str, Any] | None = None
    results: list[RequestResult] | None = None
    prefix: list[tuple[float, float] | None] | None = None  # per stage (hits delta, queries delta)
    repeats: int = 1


def build_report(meta: dict[str, Any], stages: Sequence[tuple[float, float]], runs: Sequence[SetupRun]) -> dict[str, Any]:
    """``stages``: (rate, duration) per stage."""
    setups: dict[str, Any] = {}
    bounds = []
    t = 0.0
    for _rate, dur in stages:
        bounds.append((t, dur))
        t += dur
    for run in runs:
        entry: dict[str, Any] = {"status": run.status, "reason": run.reason, "config": run.config or {}, "repeats": run.repeats}
        if run.status == "ok" and run.results is not None:
            per_stage = []
            for i, (rate, _dur) in enumerate(stages):
                rs = [r for r in run.results if r.stage == i]
                hits = queries = None
                if run.prefix and i < len(run.prefix) and run.prefix[i] is not None:
                    hits, queries = run.prefix[i]  # type: ignore[misc]
                start, dur = bounds[i]
                s = summarize_stage(
                    rs, stage=i, offered_rate=rate, stage_start=start, stage_duration=dur, prefix_hits=hits, prefix_queries=queries
                )
                if run.repeats > 1:
                    # Repeats replay the stage N times; rates are per replay.
                    s["achieved_rate"] = round(s["achieved_rate"] / run.repeats, 3)
                    s["output_tok_s"] = round(s["output_tok_s"] / run.repeats, 2)
                per_stage.append(s)
            entry["stages"] = per_stage
        pred = (run.config or {}).get("predictor")
        if isinstance(pred, dict):
            entry["predictor"] = predictor_block(pred)
        setups[run.name] = entry
    return {"schema": SCHEMA, **meta, "stages": [{"rate": r, "duration_s": d} for r, d in stages], "setups": setups}


PREDICTOR_KEYS = ("warm_start", "samples_trained", "retrains", "fallback_decisions", "decisions", "online_ttft_mape", "online_tpot_mape")


def tail_mape(curve_raw: Sequence[Sequence[float]], after: int) -> tuple[float | None, float | None, int]:
    """Online TTFT / TPOT MAPE over the samples observed after the first ``after`` (from the learning-curve
    buckets ``[samples seen, TTFT APE sum, n, TPOT APE sum, n]``), and how many TTFT predictions that covers."""
    ts = tn = ps = pn = 0.0
    for seen, a, n, b, m in curve_raw:
        if seen > after:
            ts, tn, ps, pn = ts + a, tn + n, ps + b, pn + m
    return (round(ts / tn, 4) if tn else None, round(ps / pn, 4) if pn else None, int(tn))


def predictor_block(pred: dict[str, Any]) -> dict[str, Any]:
    """The report's per-setup ``predictor`` block: the contract keys first, then detail (per-stage counts,
    the learning curve as [samples seen, TTFT MAPE, TPOT MAPE] per bucket, MAPE after 2,000 samples)."""
    out = {k: pred.get(k) for k in PREDICTOR_KEYS}
    raw = pred.get("curve_raw") or []
    t, p, n = tail_mape(raw, 2000)
    out["online_ttft_mape_after_2000"] = t
    out["online_tpot_mape_after_2000"] = p
    out["predictions_after_2000"] = n
    for k, v in pred.items():
        if k not in out and k != "curve_raw":
            out[k] = v
    return out


REQUIRED_STAGE_KEYS = ("requests", "ok", "failed", "ttft_ms", "tpot_ms", "e2e_ms", "output_tok_s", "prefix_hit_rate", "offered_rate")


def validate_report(report: dict[str, Any]) -> list[str]:
    """Schema problems of a report (empty list = valid)."""
    problems: list[str] = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("workload", "seed", "virtual", "stages", "setups"):
        if key not in report:
            problems.append(f"missing top-level key {key!r}")
    for name, s in (report.get("setups") or {}).items():
        if s.get("status") not in ("ok", "skipped", "failed"):
            problems.append(f"{name}: bad status {s.get('status')!r}")
        if s.get("status") != "ok":
            if not s.get("reason"):
                problems.append(f"{name}: {s.get('status')} without a reason")
            continue
        if "config" not in s:
            problems.append(f"{name}: missing config")
        stages = s.get("stages")
        if not isinstance(stages, list) or len(stages) != len(report.get("stages") or []):
            problems.append(f"{name}: stages missing or of the wrong length")
            continue
        for st in stages:
            for k in REQUIRED_STAGE_KEYS:
                if k not in st:
                    problems.append(f"{name} stage {st.get('stage')}: missing {k!r}")
            for k, sub in (("ttft_ms", ("p50", "p90", "p99", "mean")), ("tpot_ms", ("p50", "p90")), ("e2e_ms", ("p50", "p90"))):
                for q in sub:
                    if q not in (st.get(k) or {}):
                        problems.append(f"{name} stage {st.get('stage')}: missing {k}.{q}")
            if st.get("ok", 0) + st.get("failed", 0) != st.get("requests"):
                problems.append(f"{name} stage {st.get('stage')}: ok + failed != requests")
    return problems


# ------------------------------------------------------------------------------------------------------ output


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# extproc bench: {report['workload']} ({'virtual time' if report['virtual'] else 'real time'})",
        "",
        f"seed {report['seed']}, fleet `{report.get('fleet', '')}`, stages "
        + ", ".join(f"{s['rate']:g} req/s × {s['duration_s']:g} s" for s in report["stages"]),
        "",
    ]
    skipped = [(n, s) for n, s in report["setups"].items() if s["status"] != "ok"]
    ok_setups = [(n, s) for n, s in report["setups"].items() if s["status"] == "ok"]
    for i, st in enumerate(report["stages"]):
        lines += [
            f"## Stage {i}: {st['rate']:g} req/s offered",
            "",
            "| setup | ok/req | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | E2E p50 | E2E p90 | out tok/s | prefix hit |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in ok_setups:
            x = s["stages"][i]
            hit = x["prefix_hit_rate"]
            lines.append(
                f"| {name} | {x['ok']}/{x['requests']} | {_fmt(x['ttft_ms']['p50'])} | {_fmt(x['ttft_ms']['p90'])} | "
                f"{_fmt(x['ttft_ms']['p99'])} | {_fmt(x['tpot_ms']['p50'])} | {_fmt(x['tpot_ms']['p90'])} | "
                f"{_fmt(x['e2e_ms']['p50'])} | {_fmt(x['e2e_ms']['p90'])} | {_fmt(x['output_tok_s'])} | "
                f"{'–' if hit is None else f'{hit:.1%}'} |"
            )
        lines.append("")
    lines.append("Times in ms. TTFT = first content chunk; TPOT = (E2E − TTFT) / (output tokens − 1).")
    preds = [(n, s["predictor"]) for n, s in ok_setups if isinstance(s.get("predictor"), dict)]
    if preds:
        lines += [
            "",
            "## Latency predictor",
            "",
            "| setup | warm start | samples | retrains | fallback / decisions | fallback per stage | online TTFT MAPE | TPOT MAPE | TTFT MAPE after 2k |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, p in preds:
            per = ", ".join(f"{x['fallback_decisions']}/{x['decisions']}" for x in p.get("stages") or ())
            lines.append(
                f"| {n} | {p.get('warm_start') or 'cold'} | {p.get('samples_trained')} | {p.get('retrains')} | "
                f"{p.get('fallback_decisions')}/{p.get('decisions')} | {per or '–'} | {_fmt(p.get('online_ttft_mape'), 3)} | "
                f"{_fmt(p.get('online_tpot_mape'), 3)} | {_fmt(p.get('online_ttft_mape_after_2000'), 3)} |"
            )
        pd_preds = [(n, p) for n, p in preds if p.get("prefill_leg_samples")]
        if pd_preds:
            lines += [
                "",
                "P/D legs (online, the point model on the requests it predicted; coverage = share at or under the "
                "p90 prediction):",
                "",
                "| setup | prefill-leg samples | prefill-leg MAPE | coverage | decode-leg samples | TTFT-after-prefill MAPE "
                "| coverage | TTFT (sum of legs) MAPE |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for n, p in pd_preds:
                lines.append(
                    f"| {n} | {p.get('prefill_leg_samples')} | {_fmt(p.get('online_prefill_leg_mape'), 3)} | "
                    f"{_fmt(p.get('online_prefill_leg_p90_coverage'), 3)} | {p.get('decode_leg_samples')} | "
                    f"{_fmt(p.get('online_ttft_after_prefill_mape'), 3)} | "
                    f"{_fmt(p.get('online_ttft_after_prefill_p90_coverage'), 3)} | {_fmt(p.get('online_pd_ttft_mape'), 3)} |"
                )
    lines += _aiperf_markdown(report)
    if skipped:
        lines += ["", "## Not run", ""]
        lines += [f"- **{n}** ({s['status']}): {s['reason']}" for n, s in skipped]
    return "\n".join(lines) + "\n"


def _aiperf_markdown(report: dict[str, Any]) -> list[str]:
    """The ``--aiperf`` cross-check: our client and aiperf, same stack and fixed-concurrency load, one row each."""
    entries = [(n, s["aiperf"]) for n, s in report["setups"].items() if isinstance(s.get("aiperf"), dict)]
    if not entries:
        return []
    load = entries[0][1].get("load") or {}
    lines = [
        "",
        f"## Cross-check with aiperf: {load.get('api', '')}, concurrency {load.get('concurrency')}, "
        f"{load.get('requests')} requests, ISL {load.get('isl')}, OSL {load.get('osl')}",
        "",
        "| setup | client | ok/req | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p90 | E2E p50 | E2E p90 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, e in entries:
        if e.get("status") != "ok":
            notes.append(f"- **{name}**: aiperf cross-check {e.get('status')}: {e.get('reason', '')}")
            continue
        for tool in ("ours", "aiperf"):
            x = e[tool]
            lines.append(
                f"| {name} | {tool} | {x.get('ok')}/{x.get('requests')} | {_fmt(x.get('request_throughput'), 2)} | "
                f"{_fmt(x.get('output_tok_s'))} | {_fmt(x['ttft_ms']['p50'])} | {_fmt(x['ttft_ms']['p90'])} | "
                f"{_fmt(x['ttft_ms']['p99'])} | {_fmt(x['itl_ms']['p50'], 2)} | {_fmt(x['itl_ms']['p90'], 2)} | "
                f"{_fmt(x['e2e_ms']['p50'])} | {_fmt(x['e2e_ms']['p90'])} |"
            )
    lines += ["", "Same stack, run back to back (ours first). ITL = (E2E − TTFT) / (output tokens − 1) in both tools."]
    if notes:
        lines += [""] + notes
    return lines


def write_outputs(out_dir: str, report: dict[str, Any], runs: Sequence[SetupRun], plots: bool = True) -> list[str]:
    """Write report.json, report.md and the plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "report.json")
    with open(p, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    paths.append(p)
    p = os.path.join(out_dir, "report.md")
    with open(p, "w", encoding="utf-8") as f:
        f.write(markdown(report))
    paths.append(p)
    if plots:
        paths += write_plots(out_dir, report, runs)
    return paths


def write_plots(out_dir: str, report: dict[str, Any], runs: Sequence[SetupRun]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[str] = []
    ok_runs = [r for r in runs if r.status == "ok" and r.results]
    title = f"{report['workload']} ({'virtual' if report['virtual'] else 'real'} time)"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok_runs:
        xs = sorted(x.ttft_ms for x in r.results or () if x.ok)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF, all stages — {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    p = os.path.join(out_dir, "ttft_cdf.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    rates = [s["rate"] for s in report["stages"]]
    for fname, key, sub, ylabel, log in (
        ("ttft_p90_vs_rate.png", "ttft_ms", "p90", "TTFT p90 (ms, log)", True),
        ("throughput_vs_rate.png", "output_tok_s", None, "output tokens/s", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, s in report["setups"].items():
            if s["status"] != "ok":
                continue
            ys = [(st[key][sub] if sub else st[key]) for st in s["stages"]]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(rates, ys, marker="o", label=name)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        p = os.path.join(out_dir, fname)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    curves = [(n, s["predictor"]["curve"]) for n, s in report["setups"].items()
              if s["status"] == "ok" and isinstance(s.get("predictor"), dict) and s["predictor"].get("curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curve in curves:
            xs = [c[0] for c in curve]
            ax.plot(xs, [math.nan if c[1] is None else c[1] for c in curve], marker=".", label=f"{name} TTFT")
            ax.plot(xs, [math.nan if c[2] is None else c[2] for c in curve], marker=".", linestyle="--", label=f"{name} TPOT")
        ax.set_xlabel("requests seen (training samples)")
        ax.set_ylabel("online MAPE (per 100 requests)")
        ax.set_title(f"Predictor learning curve — {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        p = os.path.join(out_dir, "predictor_learning_curve.png")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
