"""`extproc bench --setups extproc:PATH`: a user's own config file (here llm-d's samples, unchanged) benchmarked
next to the built-in setups, in virtual time and through real Envoy in real time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from extproc.bench import cli
from extproc.bench.setups import parse_setups

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "llmd-configs"
APPROX = SAMPLES / "deploy" / "sim-epp-config.yaml"
NO_HIT = SAMPLES / "perf" / "optimized-baseline.yaml"


def _args(out: Path, **kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = [f"--out={out}", "--no-progress", "--no-plots"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def _ok(report: dict, name: str) -> dict:  # type: ignore[type-arg]
    s = report["setups"][name]
    assert s["status"] == "ok", s
    for st in s["stages"]:
        assert st["requests"] > 0 and st["ok"] == st["requests"], st
        assert 0 < st["ttft_ms"]["p50"] <= st["ttft_ms"]["p99"]
    return s


def test_parse_path_setups(tmp_path: Path) -> None:
    (s,) = parse_setups(f"extproc:{APPROX}")
    assert (s.kind, s.config, s.kv_events) == ("extproc", str(APPROX), False)
    (p,) = parse_setups(f"extproc:{SAMPLES / 'deploy' / 'sim-epp-kvcache-config.yaml'}")
    assert p.kv_events is True  # precise-prefix-cache-producer: the fleet must publish KV events
    with pytest.raises(ValueError, match="no such config file"):
        parse_setups(f"extproc:{tmp_path / 'missing.yaml'}")
    with pytest.raises(ValueError, match="needs a config path"):
        parse_setups("extproc:")


def test_virtual_path_setups_side_by_side(tmp_path: Path) -> None:
    names = ["extproc-default", f"extproc:{APPROX}", f"extproc:{NO_HIT}"]
    rc = cli.run(_args(tmp_path, workload="shared-prefix", virtual=True, setups=",".join(names), stages="8:2,16:2", fleet="4"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0
    for n in names:
        _ok(report, n)
    assert report["setups"][f"extproc:{APPROX}"]["config"]["config"] == str(APPROX)


@pytest.mark.envoy
def test_real_time_path_setup_through_envoy(tmp_path: Path) -> None:
    name = f"extproc:{APPROX}"
    rc = cli.run(_args(tmp_path, workload="shared-prefix", setups=f"extproc-default,{name}", stages="4:2", fleet="2", time_scale="0.5"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0
    s = _ok(report, name)
    assert s["config"]["proxy"] == "envoy+extproc" and s["config"]["config"] == str(APPROX)
