"""``extproc plan``: Pareto logic, SPEC validation (file, field, reason), determinism for a seed, and a tiny
end-to-end run whose winner ``extproc bench --virtual`` reproduces exactly."""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.bench.plan.evaluate import Candidate, Materializer, canonical, class_metrics
from extproc.bench.plan.output import build as build_report
from extproc.bench.plan.output import markdown
from extproc.bench.plan.pareto import dominates, pareto_front, rank_key
from extproc.bench.plan.search import run_search
from extproc.bench.plan.spec import SpecError, load_spec, parse_spec
from extproc.bench.plan.traffic import build_workload
from extproc.bench.report import RequestResult
from extproc.cli import main

# ------------------------------------------------------------------------------------------------ Pareto logic


def test_pareto_front_by_hand() -> None:
    pts = [
        (1.0, 0.2),  # 0 cheapest: on the front
        (2.0, 0.2),  # 1 dominated by 0 (dearer, same attainment)
        (2.0, 0.9),  # 2 front
        (2.0, 0.9),  # 3 equal to 2: also on the front
        (3.0, 0.8),  # 4 dominated by 2
        (4.0, 1.0),  # 5 front
        (5.0, 1.0),  # 6 dominated by 5
    ]
    assert pareto_front(pts) == [0, 2, 3, 5]
    assert dominates((1, 0.5), (2, 0.5)) and dominates((1, 0.6), (1, 0.5))
    assert not dominates((1, 0.5), (1, 0.5)) and not dominates((1, 0.4), (2, 0.5))
    assert pareto_front([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8).map(float), st.integers(0, 8).map(lambda x: x / 8)), max_size=30))
def test_pareto_front_property(pts: list[tuple[float, float]]) -> None:
    front = set(pareto_front(pts))
    for i in range(len(pts)):
        dominated = any(dominates(pts[j], pts[i]) for j in range(len(pts)))
        assert (i in front) == (not dominated), (i, pts)


def test_rank_key_feasible_cheapest_first() -> None:
    rows = [
        (False, 1.0, 0.99, 0.1, 0),  # cheap but misses an SLO
        (True, 5.0, 1.00, -0.5, 1),
        (True, 3.0, 0.95, -0.1, 2),  # cheapest feasible
        (True, 3.0, 0.97, -0.1, 3),  # same cost, higher attainment: ahead of 2
        (False, 9.0, 0.10, 2.0, 4),
    ]
    order = sorted(rows, key=lambda r: rank_key(*r))
    assert [r[4] for r in order] == [3, 2, 1, 0, 4]


# ---------------------------------------------------------------------------------------------- SPEC validation

BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "workload": {
        "kv_blocks": 600,
        "classes": [
            {"name": "interactive", "priority": 10, "workload": "shared-prefix", "stages": "4:4"},
            {"name": "batch", "priority": -1, "stages": "2:4",
             "lengths": {"input_tokens": {"mean": 600, "sigma": 0.5, "min": 32, "max": 2000}, "output_tokens": 40}},
        ],
    },
    "slos": {"interactive": {"ttft_p90_ms": 300, "itl_p90_ms": 60}, "batch": {"e2e_p90_ms": 20000, "success_rate": 0.5}},
    "search": {
        "pods": {"llama3-8b-h100": {"counts": [0, 1], "cost_per_hour": 4.0},
                 "llama3-8b-l40s": {"counts": [0, 1, 2], "cost_per_hour": 1.0}},
        "routing": ["default", "prefix-load"],
        "admission": {"queueDepthThreshold": [1, 5]},
    },
    "budget": 50,
}


def _write(tmp_path: Path, raw: Any, name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(p)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """BASE with ``path`` ("a.b[0].c") set to ``value`` (``...`` deletes it)."""
    raw = copy.deepcopy(BASE)
    keys: list[Any] = []
    for part in path.split("."):
        if "[" in part:
            k, idx = part[:-1].split("[")
            keys += [k, int(idx)]
        else:
            keys.append(part)
    node: Any = raw
    for k in keys[:-1]:
        node = node[k]
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


BAD = [
    ("budgt", 5, "budgt", "unknown key"),
    ("workload", ..., "workload", "is required"),
    ("workload.classes", [], "workload.classes", "non-empty list"),
    ("workload.classes[0].workload", "nope", "workload.classes[0].workload", "unknown workload 'nope'"),
    ("workload.classes[0].lengths", {"input_tokens": 5, "output_tokens": 5}, "workload.classes[0]", "exactly one of workload, lengths, trace"),
    ("workload.classes[1].lengths", ..., "workload.classes[1]", "exactly one of"),
    ("workload.classes[0].stages", "fast", "workload.classes[0].stages", "RATE:SECONDS"),
    ("workload.classes[0].stages", ..., "workload.classes[0].stages", "is required"),
    ("workload.classes[0].priority", "high", "workload.classes[0].priority", "must be an integer"),
    ("workload.classes[1].name", "interactive", "workload.classes[1].name", "duplicate class name"),
    ("workload.classes[1].lengths.input_tokens", {"mean": 50, "min": 500, "max": 100}, "workload.classes[1].lengths.input_tokens.max", "must be >= min"),
    ("workload.classes[1].lengths.input_tokens", {"mean": 10, "min": 100, "max": 200}, "workload.classes[1].lengths.input_tokens.mean", "within [min, max]"),
    ("slos.interactive.ttft_p100_ms", 5, "slos.interactive.ttft_p100_ms", "unknown SLO"),
    ("slos.interactive.latency", 5, "slos.interactive.latency", "unknown SLO"),
    ("slos.interactive.ttft_p90_ms", -1, "slos.interactive.ttft_p90_ms", "must be > 0"),
    ("slos.batch.success_rate", 1.5, "slos.batch.success_rate", "within [0, 1]"),
    ("slos.gold", {"ttft_p90_ms": 5}, "slos.gold", "unknown key"),
    ("search.pods.llama3-8b-b200", {"counts": [1], "cost_per_hour": 1}, "search.pods.llama3-8b-b200", "unknown profile"),
    ("search.pods.llama3-8b-h100.cost_per_hour", -2, "search.pods.llama3-8b-h100.cost_per_hour", "must be >= 0"),
    ("search.pods.llama3-8b-h100.counts", [1, 1], "search.pods.llama3-8b-h100.counts", "duplicate values"),
    ("search.pods.llama3-8b-h100.counts", [], "search.pods.llama3-8b-h100.counts", "at least one value"),
    ("search.pods.llama3-8b-h100.cost", 1, "search.pods.llama3-8b-h100.cost", "unknown key"),
    ("search.pods", {"llama3-8b-h100": {"counts": [0], "cost_per_hour": 1}}, "search.pods", "every count is 0"),
    ("search.routing", ["default", "no-such-config"], "search.routing[1]", "no built-in config named 'no-such-config'"),
    ("search.routing", ["./missing.yaml"], "search.routing[0]", "no such config file"),
    ("search.routing", ["pd"], "search.routing[0]", "is a P/D config"),
    ("search.pd_routing", "default", "search.pd_routing", "no P/D profile handler"),
    ("search.pd_prefill", [3], "search.pd_prefill", "fewer prefill pods than the largest fleet (3)"),
    ("search.admission", {"maxInflight": [1]}, "search.admission.maxInflight", "unknown key"),
    ("search.admission", {"queueDepthThreshold": [1.5]}, "search.admission.queueDepthThreshold", "must be an integer"),
    ("search.max_num_seqs", [0], "search.max_num_seqs", "must be >= 1"),
    ("method", "annealing", "method", "must be one of"),
    ("budget", 0, "budget", "must be >= 1"),
]


@pytest.mark.parametrize("path,value,field,reason", BAD, ids=[b[0] + "=" + str(b[1])[:20] for b in BAD])
def test_bad_specs_name_file_field_reason(tmp_path: Path, path: str, value: Any, field: str, reason: str) -> None:
    spec = _write(tmp_path, _mutate(path, value))
    with pytest.raises(SpecError) as ei:
        load_spec(spec)
    e = ei.value
    assert e.path == spec and e.field == field, str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"{spec}: {field}: ")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("workload: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(str(p))
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_spec(["a"], "x.yaml")


def test_bad_trace_names_the_line(tmp_path: Path) -> None:
    tr = tmp_path / "t.jsonl"
    tr.write_text('{"arrival": 0.1, "input_tokens": 100, "output_tokens": 10}\n# comment\n{"arrival": 0.2, "input_tokens": 0, "output_tokens": 10}\n')
    raw = _mutate("workload.classes[1]", {"name": "batch", "priority": -1, "trace": "t.jsonl"})
    spec = _write(tmp_path, raw)
    with pytest.raises(SpecError) as ei:
        load_spec(spec)
    assert ei.value.path == str(tr) and ei.value.field == "line 3.input_tokens" and "must be >= 1" in ei.value.reason
    # a trace brings its own arrivals
    tr.write_text('{"arrival": 0.1, "input_tokens": 100, "output_tokens": 10}\n')
    raw["workload"]["classes"][1]["stages"] = "1:1"
    with pytest.raises(SpecError, match="brings its own arrival times"):
        load_spec(_write(tmp_path, raw))


def test_cli_reports_spec_error_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write(tmp_path, _mutate("slos.interactive.ttft_p90_ms", "fast"))
    assert main(["plan", spec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: slos.interactive.ttft_p90_ms: must be a finite number" in err
    assert not (tmp_path / "out" / "pareto.json").exists()


# ------------------------------------------------------------------------------------------------ the trace


def test_trace_classes_merge_and_tag(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"arrival": 2.5, "input_tokens": 300, "output_tokens": 20, "prefix_group": 1, "prefix_tokens": 200},
        {"arrival": 0.5, "input_tokens": 300, "output_tokens": 20, "prefix_group": 1, "prefix_tokens": 200},
        {"arrival": 1.0, "input_tokens": 50, "output_tokens": 5},
    ]) + "\n")
    raw = _mutate("workload.classes[1]", {"name": "replay", "priority": -1, "trace": "t.jsonl"})
    raw["slos"] = {"interactive": {"ttft_p90_ms": 300}}
    spec = load_spec(_write(tmp_path, raw))
    wl = build_workload(spec)
    assert [r.index for r in wl.requests] == list(range(len(wl.requests)))
    assert [r.arrival for r in wl.requests] == sorted(r.arrival for r in wl.requests)
    replay = [r for r in wl.requests if r.objective == "replay"]
    assert [r.arrival for r in replay] == [0.5, 1.0, 2.5] and [r.max_tokens for r in replay] == [20, 5, 20]
    assert replay[0].parts[0] == replay[2].parts[0]  # same prefix group: same prefix text
    assert all(r.headers()["x-gateway-inference-objective"] in ("interactive", "replay") for r in wl.requests)
    assert build_workload(spec).requests == wl.requests  # deterministic


# ------------------------------------------------------------------------------------------------ metrics


def test_class_metrics_slos_and_attainment(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, BASE))
    wl = build_workload(spec)
    inter = [r.index for r in wl.requests if r.objective == "interactive"]
    batch = [r.index for r in wl.requests if r.objective == "batch"]
    results = []
    for k, i in enumerate(inter):  # 1 in 4 interactive requests misses the TTFT target
        results.append(RequestResult(i, 0, 0.0, True, 200, ttft_ms=500.0 if k % 4 == 0 else 100.0, e2e_ms=1000.0, output_tokens=11))
    for k, i in enumerate(batch):  # half the batch requests are shed
        results.append(RequestResult(i, 0, 0.0, True, 200, ttft_ms=50.0, e2e_ms=900.0, output_tokens=40) if k % 2 else
                       RequestResult(i, 0, 0.0, False, 429))
    m = class_metrics(spec, wl, results)
    checks = {(c["class"], c["slo"]): c for c in m["checks"]}
    assert checks[("interactive", "ttft_p90_ms")]["met"] is False and checks[("interactive", "ttft_p90_ms")]["value"] == 500.0
    assert checks[("interactive", "itl_p90_ms")]["value"] == pytest.approx(90.0) and checks[("interactive", "itl_p90_ms")]["met"] is False
    sr = checks[("batch", "success_rate")]
    assert sr["value"] == pytest.approx(len(batch) // 2 / len(batch), abs=1e-3)
    assert m["classes"]["interactive"]["attainment"] == 0.0  # ITL 90 ms > 60 on every request
    assert m["classes"]["batch"]["attainment"] == pytest.approx(len(batch) // 2 / len(batch), abs=1e-3)
    assert m["slo_met"] is False and m["violation"] == pytest.approx(2 / 3, abs=1e-3)  # ttft 500 / 300 - 1
    assert m["slo_attainment"] == pytest.approx((0.0 + m["classes"]["batch"]["attainment"]) / 2, abs=1e-3)


def test_canonical_drops_non_deployments_and_pins_pd_routing(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["search"]["pd_prefill"] = [0, 1]
    spec = load_spec(_write(tmp_path, raw))
    base = {"pods.llama3-8b-h100": 0, "pods.llama3-8b-l40s": 0, "pd_prefill": 0, "max_num_seqs": None,
            "max_num_batched_tokens": None, "routing": spec.routing[1], "admission.queueDepthThreshold": 1.0}
    assert canonical(spec, base) is None  # no pod
    assert canonical(spec, {**base, "pods.llama3-8b-l40s": 1, "pd_prefill": 1}) is None  # no decode pod left
    a = canonical(spec, {**base, "pods.llama3-8b-h100": 1, "pods.llama3-8b-l40s": 2, "pd_prefill": 1})
    b = canonical(spec, {**base, "pods.llama3-8b-h100": 1, "pods.llama3-8b-l40s": 2, "pd_prefill": 1, "routing": spec.routing[0]})
    assert isinstance(a, Candidate) and isinstance(b, Candidate)
    assert a.key == b.key and a.params["routing"] == spec.pd_routing  # one deployment, whatever "routing" said
    assert a.cost_per_hour == 6.0 and a.fleet == [("llama3-8b-h100", 1), ("llama3-8b-l40s", 2)]


def test_candidate_config_carries_objectives_and_admission(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, BASE))
    c = canonical(spec, {"pods.llama3-8b-h100": 1, "pods.llama3-8b-l40s": 0, "pd_prefill": 0, "max_num_seqs": 32,
                         "max_num_batched_tokens": None, "routing": spec.routing[0], "admission.queueDepthThreshold": 5.0})
    assert c is not None
    mat = Materializer(spec, str(tmp_path / "out"))
    cfg = yaml.safe_load(open(mat.config(c)))
    assert {o["name"]: o["priority"] for o in cfg["objectives"]} == {"interactive": 10, "batch": -1}
    assert cfg["saturationDetector"]["queueDepthThreshold"] == 5
    fleet = mat.fleet(c)
    prof_path, n = fleet.rsplit(":", 1)
    prof = yaml.safe_load(open(prof_path))
    assert n == "1" and prof["max_num_seqs"] == 32 and prof["max_num_batched_tokens"] == 8192


# ------------------------------------------------------------------------------------- determinism, end to end


def _tiny(tmp_path: Path, **over: Any) -> str:
    raw = copy.deepcopy(BASE)
    raw.update(over)
    return _write(tmp_path, raw)


def _strip(evs: list[Any]) -> list[Any]:
    return [(e.id, e.candidate.key, e.fleet, os.path.basename(e.config), e.metrics, e.checks, e.slo_attainment, e.virtual_seconds)
            for e in evs]


@pytest.mark.parametrize("method", ["optuna", "random"])
def test_search_is_deterministic_for_a_seed(tmp_path: Path, method: str) -> None:
    spec_path = _tiny(tmp_path, method=method, budget=6)
    runs = []
    for i in range(2):
        spec = load_spec(spec_path)
        wl = build_workload(spec)
        res = run_search(spec, wl, Materializer(spec, str(tmp_path / f"o{i}")))
        assert res.method == method and len(res.evaluations) == 6
        assert len({e.candidate.key for e in res.evaluations}) == 6  # distinct deployments
        runs.append(_strip(res.evaluations))
    assert runs[0] == runs[1]
    spec = load_spec(spec_path)
    spec.seed = 1
    res = run_search(spec, build_workload(spec), Materializer(spec, str(tmp_path / "o2")))
    assert _strip(res.evaluations) != runs[0]  # another seed: another trace and other trials


def test_objectives_reach_the_virtual_gateway(tmp_path: Path) -> None:
    """queueDepthThreshold 0: every pod counts as saturated, so every sheddable (batch) request gets 429 and no
    interactive one does — only if the class's objective maps to its priority in virtual time."""
    raw = copy.deepcopy(BASE)
    raw["search"]["pods"] = {"llama3-8b-h100": {"counts": [1], "cost_per_hour": 4.0}}
    raw["search"]["routing"] = ["default"]
    raw["search"]["admission"] = {"queueDepthThreshold": [0]}
    spec = load_spec(_write(tmp_path, raw))
    res = run_search(spec, build_workload(spec), Materializer(spec, str(tmp_path / "o")))
    (ev,) = res.evaluations
    assert ev.metrics["classes"]["batch"]["ok"] == 0 and ev.metrics["classes"]["batch"]["errors"] == {"429": ev.metrics["classes"]["batch"]["requests"]}
    assert ev.metrics["classes"]["interactive"]["ok"] == ev.metrics["classes"]["interactive"]["requests"] > 0


def test_plan_end_to_end_and_bench_reproduces_the_winner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["plan", spec, "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    rep = json.loads((out / "pareto.json").read_text())
    assert rep["schema"] == "extproc-plan/1" and rep["method"] == "grid"  # 20 valid points fit the budget
    assert rep["evaluated"] == rep["valid_grid"] == len(rep["candidates"]) == 20
    assert (out / "pareto.png").stat().st_size > 1000 and "| rank |" in (out / "ranked.md").read_text()
    cands = {c["id"]: c for c in rep["candidates"]}
    front = set(rep["pareto_front"])
    assert front == {c["id"] for c in rep["candidates"] if c["pareto"]} and front
    for c in rep["candidates"]:  # the front as marked is exactly the non-dominated set
        pt = (c["cost_per_hour"], c["slo_attainment"])
        assert (c["id"] in front) == (not any(dominates((d["cost_per_hour"], d["slo_attainment"]), pt) for d in rep["candidates"]))
    assert sorted(c["rank"] for c in rep["candidates"]) == list(range(1, 21))
    w = rep["winner"]
    assert w is not None and cands[w]["rank"] == 1 and cands[w]["slo_met"]
    cheaper_ok = [c for c in rep["candidates"] if c["slo_met"] and c["cost_per_hour"] < cands[w]["cost_per_hour"]]
    assert not cheaper_ok
    assert f"Cheapest configuration meeting every SLO: {w}" in text
    # the bench line the plan prints, run in virtual time, gives the plan's numbers for the winner exactly
    argv = shlex.split(cands[w]["bench_command"])[1:] + ["--virtual", "--no-progress", "--no-plots"]
    argv[argv.index("--out") + 1] = str(tmp_path / "rv")
    assert main(argv) == 0
    bench = json.loads((tmp_path / "rv" / "report.json").read_text())
    (setup,) = bench["setups"].values()
    assert setup["classes"]["classes"] == cands[w]["metrics"]["classes"]
    assert setup["classes"]["checks"] == cands[w]["checks"] and math.isclose(setup["classes"]["slo_attainment"], cands[w]["slo_attainment"])


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A profile file that disappears after the SPEC was read: every candidate using it fails (recorded with
    the error), the others still run, and the command exits 1."""
    prof = tmp_path / "gone.yaml"
    from extproc.sim.profiles import get_profile

    get_profile("llama3-8b-l40s").replace(name="gone").to_yaml(prof)
    raw = copy.deepcopy(BASE)
    raw["search"]["pods"] = {"llama3-8b-h100": {"counts": [0, 1], "cost_per_hour": 4.0}, "gone.yaml": {"counts": [0, 1], "cost_per_hour": 1.0}}
    raw["search"]["routing"] = ["default"]
    raw["search"]["admission"] = {}
    spec_path = _write(tmp_path, raw)
    spec = load_spec(spec_path)
    prof.unlink()
    res = run_search(spec, build_workload(spec), Materializer(spec, str(tmp_path / "o")))
    by_fleet = {tuple(e.candidate.fleet): e for e in res.evaluations}
    assert len(res.evaluations) == 3
    ok = by_fleet[(("llama3-8b-h100", 1),)]
    assert ok.status == "ok" and ok.metrics["classes"]["interactive"]["ok"] > 0
    failed = [e for e in res.evaluations if e.status == "failed"]
    assert len(failed) == 2 and all("unknown profile" in e.error and not e.slo_met for e in failed)
    report = build_report(spec, build_workload(spec), res, str(tmp_path / "o"), {})
    assert report["failed"] == 2 and {c["status"] for c in report["candidates"]} == {"ok", "failed"}
    assert report["winner"] in (None, ok.id) and "failed" in markdown(report)
    # read again, the SPEC itself is now bad: the command says so before running anything
    assert main(["plan", spec_path, "--out", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "search.pods.gone.yaml: unknown profile" in capsys.readouterr().err


def test_bench_workload_spec_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _tiny(tmp_path)
    assert main(["bench", "--virtual", "--workload-spec", spec, "--stages", "1:1", "--setups", "extproc-default",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--stages does not apply with --workload-spec" in capsys.readouterr().err
    bad = _write(tmp_path, _mutate("slos.batch.success_rate", 2), "bad.yaml")
    assert main(["bench", "--virtual", "--workload-spec", bad, "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: slos.batch.success_rate: is a fraction within [0, 1]" in capsys.readouterr().err
