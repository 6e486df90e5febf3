"""The decider threshold sweep: one config per nonCachedTokens, 0 = P/D off, large thresholds split less."""

from __future__ import annotations

from pathlib import Path

from extproc.bench import virtual
from extproc.bench.pd_sweep import run_sweep
from extproc.bench.workloads import generate, parse_stages


def test_sweep_writes_json_and_plot(tmp_path: Path) -> None:
    wl = generate("pd", parse_stages("8:2"), seed=2)
    rep = run_sweep(wl, virtual.layout("8"), [0, 256, 100_000], str(tmp_path), seed=2, pd_prefill=6)
    rows = rep["setups"]
    assert rows["extproc-pd-nc0"]["split_share"] == 0.0
    assert rows["extproc-pd-nc256"]["split_share"] > 0.8
    assert rows["extproc-pd-nc100000"]["split_share"] == 0.0  # no prompt has 100k uncached tokens
    assert rows["extproc-default"]["split_share"] == 0.0
    assert (tmp_path / "pd_sweep.png").stat().st_size > 10_000 and (tmp_path / "pd_sweep.json").exists()
