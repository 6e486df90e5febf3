"""Smoke runs of ``extproc bench``: every setup and workload in virtual time, and a few setups in real time
through real Envoy (and a peer router when installed). Checks report.json's schema and that the numbers are
present and sane; never asserts speed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from extproc.bench import cli
from extproc.bench.peers import availability
from extproc.bench.setups import SETUPS
from extproc.bench.workloads import WORKLOADS


def _args(out: Path, **kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = [f"--out={out}", "--no-progress", "--no-plots"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def _check(report: dict, expect_ok: set[str]) -> None:  # type: ignore[type-arg]
    from extproc.bench.report import validate_report

    assert validate_report(report) == []
    for name, s in report["setups"].items():
        if s["status"] != "ok":
            assert s["reason"], name
            continue
        for st in s["stages"]:
            assert st["requests"] > 0
            assert st["ok"] == st["requests"], (name, st["errors"])
            t = st["ttft_ms"]
            assert 0 < t["p50"] <= t["p90"] <= t["p99"]
            assert st["e2e_ms"]["p50"] >= t["p50"]
            assert st["output_tok_s"] > 0
            assert st["prefix_hit_rate"] is not None and 0.0 <= st["prefix_hit_rate"] <= 1.0
    ok = {n for n, s in report["setups"].items() if s["status"] == "ok"}
    assert expect_ok <= ok, report["setups"]


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_virtual_every_setup(workload: str, tmp_path: Path) -> None:
    stages = "0.5:4,1:4" if workload == "long-prompts" else "8:2,16:2"
    args = _args(tmp_path, workload=workload, virtual=True, setups="all", stages=stages, fleet="4")
    rc = cli.run(args)
    report = json.loads((tmp_path / "report.json").read_text())
    _check(report, {"envoy-rr", "envoy-lr", "extproc-random", "extproc-default", "extproc-prefix-load"})
    assert rc == 0
    assert report["virtual"] is True
    for name, spec in SETUPS.items():
        assert name in report["setups"]  # never silently dropped
        if spec.kind == "peer":
            assert report["setups"][name]["status"] == "skipped"


@pytest.mark.envoy
def test_real_time_through_envoy(tmp_path: Path) -> None:
    setups = ["envoy-rr", "extproc-default"]
    if availability("sglang-router-cache") is None:
        setups.append("sglang-router-cache")
    args = _args(tmp_path, workload="shared-prefix", setups=",".join(setups), stages="4:2", fleet="2", time_scale="0.5")
    rc = cli.run(args)
    report = json.loads((tmp_path / "report.json").read_text())
    _check(report, set(setups))
    assert rc == 0
    assert report["virtual"] is False
    assert report["setups"]["extproc-default"]["config"]["proxy"] == "envoy+extproc"


def test_a_named_setup_that_cannot_run_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A setup named in --setups that is skipped (here a peer router in virtual time, where no peer can run) makes
    the run exit 1 with the reason, unless --allow-skipped; 'all' may skip peers and still pass (test above)."""
    args = _args(tmp_path, workload="shared-prefix", virtual=True, setups="extproc-default,vllm-router-cache", stages="8:2", fleet="2")
    assert cli.run(args) == 1
    err = capsys.readouterr().err
    assert "vllm-router-cache was asked for but did not run" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["setups"]["extproc-default"]["status"] == "ok" and report["setups"]["vllm-router-cache"]["status"] == "skipped"
    args = _args(tmp_path, workload="shared-prefix", virtual=True, setups="extproc-default,vllm-router-cache", stages="8:2", fleet="2",
                 allow_skipped=True)  # fmt: skip
    assert cli.run(args) == 0
