"""Percentile math, stage summaries and the report schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from extproc.bench.report import (
    RequestResult,
    SetupRun,
    build_report,
    markdown,
    percentile,
    summarize_stage,
    validate_report,
    write_outputs,
)


def test_percentile_known_values() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=200), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(xs: list[float], q: float) -> None:
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def _res(i: int, ok: bool = True, ttft: float = 10.0, e2e: float = 110.0, out: int = 11, start: float = 0.0) -> RequestResult:
    return RequestResult(i, 0, start, ok, 200 if ok else 503, ttft, e2e, out if ok else 0, "p", "" if ok else "x")


def test_tpot() -> None:
    assert _res(0).tpot_ms == pytest.approx(10.0)  # (110 - 10) / (11 - 1)
    assert _res(0, out=1).tpot_ms == 0.0


def test_summarize_stage() -> None:
    rs = [_res(i, ttft=float(i + 1), start=i * 0.1) for i in range(10)] + [_res(10, ok=False)]
    s = summarize_stage(rs, stage=0, offered_rate=10.0, stage_start=0.0, stage_duration=1.0, prefix_hits=30.0, prefix_queries=120.0)
    assert (s["requests"], s["ok"], s["failed"]) == (11, 10, 1)
    assert s["ttft_ms"]["p50"] == pytest.approx(5.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(5.5)
    assert s["prefix_hit_rate"] == pytest.approx(0.25)
    assert s["errors"] == {"503": 1}
    # 110 output tokens over the span from 0 to the last completion (0.9 s + 0.11 s)
    assert s["output_tok_s"] == pytest.approx(110 / 1.01, rel=1e-3)


def test_summarize_empty_stage() -> None:
    s = summarize_stage([], stage=0, offered_rate=1.0, stage_start=0.0, stage_duration=1.0)
    assert s["requests"] == 0 and s["ttft_ms"]["p90"] is None and s["prefix_hit_rate"] is None


def _report() -> tuple[dict, list[SetupRun]]:
    runs = [
        SetupRun("a", "ok", config={"x": 1}, results=[_res(0), _res(1, ttft=30.0)], prefix=[(5.0, 10.0)]),
        SetupRun("b", "skipped", "binary missing"),
    ]
    return build_report({"workload": "w", "seed": 0, "virtual": True, "fleet": "2"}, [(2.0, 1.0)], runs), runs


def test_report_schema_valid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rep, runs = _report()
    assert validate_report(rep) == []
    assert rep["setups"]["a"]["stages"][0]["prefix_hit_rate"] == 0.5
    md = markdown(rep)
    assert "| a |" in md and "binary missing" in md
    paths = write_outputs(str(tmp_path), rep, runs, plots=True)
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"report.json", "report.md", "ttft_cdf.png", "ttft_p90_vs_rate.png", "throughput_vs_rate.png"} <= names
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 1000


def test_report_schema_catches_problems() -> None:
    rep, _ = _report()
    del rep["setups"]["a"]["stages"][0]["ttft_ms"]["p99"]
    rep["setups"]["b"]["reason"] = ""
    problems = validate_report(rep)
    assert any("ttft_ms.p99" in p for p in problems)
    assert any("without a reason" in p for p in problems)


def test_predictor_counters_from_scheduler_metrics() -> None:
    from extproc.bench.runner import parse_predictor

    page = "\n".join([
        "# HELP extproc_predictor_fallback_total x",
        'extproc_predictor_fallback_total{reason="no_model"} 200.0',
        'extproc_predictor_fallback_total{reason="error"} 1.0',
        "extproc_predictor_predictions_total 99.0",
        "extproc_predictor_retrains_total 3.0",
        "extproc_predictor_samples 300.0",
        "extproc_predictor_ttft_mape 0.12",
        "extproc_predictor_tpot_mape NaN",
    ])
    p = parse_predictor(page)
    assert p is not None
    assert p["decisions"] == 300 and p["fallback_decisions"] == 201 and p["retrains"] == 3 and p["samples"] == 300
    assert p["ttft_mape"] == 0.12 and p["tpot_mape"] is None
    idle = "extproc_predictor_predictions_total 0.0\nextproc_predictor_samples 0.0\n"
    assert parse_predictor(idle) is None  # a config without a predictor: the metrics exist but never move


def test_predictor_block_contract_keys_and_tail_mape() -> None:
    from extproc.bench.report import PREDICTOR_KEYS, predictor_block

    raw = {"warm_start": None, "samples_trained": 2100, "retrains": 5, "fallback_decisions": 200, "decisions": 2100,
           "online_ttft_mape": 0.1, "online_tpot_mape": 0.2,
           "curve_raw": [[1900.0, 10.0, 100.0, 5.0, 100.0], [2000.0, 8.0, 100.0, 4.0, 100.0], [2100.0, 6.0, 100.0, 3.0, 50.0]]}
    b = predictor_block(raw)
    assert list(b)[: len(PREDICTOR_KEYS)] == list(PREDICTOR_KEYS)
    assert b["online_ttft_mape_after_2000"] == 0.06 and b["online_tpot_mape_after_2000"] == 0.06
    assert "curve_raw" not in b
