"""The Markdown calibration report."""

from __future__ import annotations

import os

from extproc.sim.calibrate.driver import CalibrationResult
from extproc.sim.calibrate.fit import COEFS


def render_report(res: CalibrationResult, command: str) -> str:
    p = res.profile
    lines = [
        f"# Calibration report: `{p.name}`",
        "",
        f"Command: `{command}`",
        "",
        f"Wall time: {res.seconds:.0f} s. Training requests: {res.train_requests}. "
        f"Server: block_size {res.facts.block_size}, num_gpu_blocks {res.facts.num_gpu_blocks}, "
        f"max_model_len {res.facts.max_model_len}. Machine load average (1 min) at start / end: "
        f"{res.loadavg[0]:.1f} / {res.loadavg[1]:.1f} on {os.cpu_count()} CPUs.",
        "",
        "| coefficient | fitted (ms) |",
        "|---|---|",
        f"| a0 (per admitted request) | {p.a0_ms:.4f} |",
        f"| b0 (per step) | {p.b0_ms:.4f} |",
        f"| b1 (per uncached prefill token) | {p.b1_ms:.6f} |",
        f"| b2 (per decoding sequence) | {p.b2_ms:.4f} |",
        "",
        *(
            [
                "Simulator overhead subtracted (coefficients the simulated pod showed minus those it was given, ms): "
                + ", ".join(f"{c} {res.sim_overhead[c]:+.4f}" for c in COEFS)
                + ".",
                "",
            ]
            if res.sim_overhead
            else []
        ),
        f"Training fit (relative error of the linear model on its own rows, n={res.train_fit_error.n}): "
        f"median {100 * res.train_fit_error.median:.1f} %, p90 {100 * res.train_fit_error.p90:.1f} %.",
        "",
    ]
    for url, h in res.real_prefix_hits.items():
        lines.append(
            f"Prefix-cache hit tokens during training: {h:.0f} reported by {url}'s `vllm:prefix_cache_hits_total`, "
            f"{res.expected_prefix_hits} designed (design seed {res.seed})."
        )
    for c in res.comparisons:
        lines += [
            "",
            f"## Held-out: real `{c.target}` vs simulated pod (fitted profile)",
            "",
            "| error | n | median | p90 |",
            "|---|---|---|---|",
        ]
        for scope, d in (("per request", c.per_request), ("per cell (means)", c.per_cell)):
            for metric in ("ttft", "e2e"):
                e = d[metric]
                lines.append(f"| {metric.upper()} {scope} | {e.n} | {100 * e.median:.1f} % | {100 * e.p90:.1f} % |")
        lines += [
            "",
            "| cell | n | real TTFT ms | sim TTFT ms | real e2e ms | sim e2e ms |",
            "|---|---|---|---|---|---|",
        ]
        for cell, n, rt, st, re_, se in c.cells:
            lines.append(f"| {cell} | {n} | {rt:.1f} | {st:.1f} | {re_:.1f} | {se:.1f} |")
    return "\n".join(lines) + "\n"
