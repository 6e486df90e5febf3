"""``extproc sim validate`` / ``fit``: SPEC parsing, the virtual-time driver, linear rows, coefficient recovery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from extproc.cli import main
from extproc.sim.fidelity import (
    METRICS,
    _coef_vector,
    _rows,
    fit,
    load_spec,
    nnls,
    simulate,
    validate,
)
from extproc.sim.roofline import RooflineCoefficients

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[3]


def _spec(tmp_path: Path, measured: dict[str, dict[str, float]] | None = None) -> Path:
    m = measured or {}
    doc = {
        "name": "tiny",
        "defaults": {"gpu": "H100", "block_size": 16, "max_num_seqs": 32, "max_num_batched_tokens": 1024},
        "experiments": [
            {"name": "sp", "model": "Llama-3.2-1B", "tp": 1,
             "workload": {"type": "shared_prefix", "num_groups": 3, "prompts_per_group": 4, "system_prompt_len": 64,
                          "question_len": 200, "output_len": 40},
             "stages": [{"rate": 20, "duration_s": 6, "measured": m.get("sp/0", {"ttft_mean": 20, "e2e_mean": 150})},
                        {"rate": 60, "duration_s": 6, "measured": m.get("sp/1", {"ttft_mean": 25, "e2e_mean": 200})}]},
            {"name": "len", "model": "Qwen2.5-7B", "tp": 2,
             "workload": {"type": "lengths", "input_len": {"mean": 300, "std": 80, "min": 20, "max": 900},
                          "output_len": {"mean": 30, "std": 5, "min": 2, "max": 60}, "arrival": "poisson"},
             "stages": [{"rate": 15, "duration_s": 6, "measured": m.get("len/0", {"ttft_mean": 30, "e2e_mean": 300,
                                                                                  "itl_mean": 9})}]},
        ],
    }
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_spec_errors_are_precise(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"experiments": [{"name": "x", "model": "Llama-2-7b", "gpu": "H100", "bogus": 1,
                                                  "workload": {}, "stages": []}]}))
    with pytest.raises(ValueError, match="bogus"):
        load_spec(p)
    p.write_text(yaml.safe_dump({"experiments": [{"name": "x", "model": "nope", "gpu": "H100",
                                                  "workload": {"type": "lengths", "input_len": 5, "output_len": 5},
                                                  "stages": [{"rate": 1, "duration_s": 1}]}]}))
    with pytest.raises(KeyError, match="nope"):
        load_spec(p)


def test_simulation_and_linear_rows_agree(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path))
    c = RooflineCoefficients(ingress_ms=4.0, egress_ms=1.0, step_us=700.0, seq_us=3.0)
    runs = [simulate(e, c, seed=1) for e in spec.experiments]
    assert all(r.steps > 100 for r in runs)
    # constant arrivals at 20/s for 6 s, then 60/s for 6 s
    assert int((runs[0].stage == 0).sum()) == 120 and int((runs[0].stage == 1).sum()) == 360
    rows, ys, names = _rows(runs, ["ttft_mean", "e2e_mean", "itl_mean", "e2e_p90"])
    cv = _coef_vector(c)
    by_name = {r.experiment.name: r for r in runs}
    for row, name in zip(rows, names, strict=True):
        exp, stage, metric = name.split("/")
        if metric not in by_name[exp].experiment.stages[int(stage)].measured:
            continue
        assert row @ cv == pytest.approx(by_name[exp].metrics(int(stage))[metric], rel=1e-6)
    m = runs[0].metrics(1)
    assert m["ttft_mean"] > 4.0 + 1.0 and m["e2e_mean"] > m["ttft_mean"] and m["ttft_p90"] >= m["ttft_mean"] * 0.5
    # a busier stage has longer steps
    assert runs[0].metrics(1)["itl_mean"] > runs[0].metrics(0)["itl_mean"]


def test_async_scheduling_adds_a_step_to_ttft(tmp_path: Path) -> None:
    exp = load_spec(_spec(tmp_path)).experiments[0]
    c = RooflineCoefficients(ingress_ms=0.0)
    a = simulate(exp, c, async_scheduling=True).metrics(1)
    b = simulate(exp, c, async_scheduling=False).metrics(1)
    assert a["ttft_mean"] > b["ttft_mean"] + 0.5 * b["itl_mean"]


def test_fit_recovers_known_coefficients(tmp_path: Path) -> None:
    # the coefficients not fitted keep their prior value in the truth too
    truth = RooflineCoefficients(kv=1.6, step_us=1500.0, ingress_ms=8.0)
    spec0 = load_spec(_spec(tmp_path))
    measured: dict[str, dict[str, float]] = {}
    for e in spec0.experiments:
        run = simulate(e, truth)
        for i in range(len(e.stages)):
            met = run.metrics(i)
            measured[f"{e.name}/{i}"] = {k: met[k] for k in ("ttft_mean", "e2e_mean", "itl_mean")}
    spec = load_spec(_spec(tmp_path, measured))
    got, hist = fit(spec, RooflineCoefficients(), free=("kv", "step_us", "ingress_ms"), iterations=4,
                    prior_weight=0.0, max_stage_s=None)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["loss"] < 0.02
    assert got.kv == pytest.approx(1.6, rel=0.1)
    assert got.step_us == pytest.approx(1500.0, rel=0.1)
    assert got.ingress_ms == pytest.approx(8.0, rel=0.1)


def test_nnls_matches_the_constrained_optimum() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 4))
    x_true = np.array([1.0, 0.0, 2.0, 0.5])
    b = a @ x_true - 3.0 * a[:, 1]  # the unconstrained optimum has x1 = -3: NNLS must clamp it at 0
    x = nnls(a, b)
    assert (x >= 0).all() and x[1] == 0.0
    free = [0, 2, 3]
    ref = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
    assert np.allclose(x[free], ref, atol=1e-8)


def test_cli_validate_writes_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sim", "validate", str(spec), "--out", str(out), "--max-stage-seconds", "3"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 1000
    assert {e["name"] for e in rep["experiments"]} == {"sp", "len"}
    st = rep["experiments"][0]["stages"][0]["metrics"]["ttft_mean"]
    assert set(st) == {"predicted", "measured", "rel_error"}
    assert st["rel_error"] == pytest.approx((st["predicted"] - st["measured"]) / st["measured"], abs=1e-4)
    assert set(rep["summary"]) <= set(METRICS) and rep["summary"]["e2e_mean"]["n"] == 3
    assert "median_abs_rel_error" in rep["summary"]["ttft_mean"] and "p90_abs_rel_error" in rep["summary"]["ttft_mean"]
    assert main(["sim", "validate", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


def test_cli_fit_writes_loadable_coefficients(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "coef.yaml"
    assert main(["sim", "fit", str(spec), "--out", str(out), "--iterations", "1", "--free", "step_us,ingress_ms",
                 "--max-stage-seconds", "3"]) == 0
    c = RooflineCoefficients.from_yaml(out)
    assert c.source.startswith("fit on tiny")
    assert main(["sim", "fit", str(spec), "--out", str(out), "--free", "bogus"]) == 2


def test_shipped_specs_parse_and_split_by_model() -> None:
    fit_spec = load_spec(REPO / "benchmarks/fidelity/h100-fit.yaml")
    held = load_spec(REPO / "benchmarks/fidelity/h100-heldout.yaml")
    fit_models = {e.model_name for e in fit_spec.experiments}
    held_models = {e.model_name for e in held.experiments}
    assert fit_models == {"Llama-2-7b", "Llama-2-70b"} and held_models == {"CodeLlama-34b", "Mixtral-8x7B"}
    assert sum(len(e.stages) for e in fit_spec.experiments + held.experiments) == 21
    assert all(e.source.startswith("inference-sim/training@") for e in fit_spec.experiments + held.experiments)


def test_validate_returns_summary_by_model(tmp_path: Path) -> None:
    rep = validate(load_spec(_spec(tmp_path)), RooflineCoefficients(), max_stage_s=3.0)
    assert set(rep["by_model"]) == {"Llama-3.2-1B", "Qwen2.5-7B"}
    assert rep["experiments"][0]["stages"][0]["simulated_s"] == 3.0
