"""``extproc demo --batch --report r.json``: a batch job beside the interactive workload, both reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.envoy


def test_demo_batch_reports_batch_beside_interactive(tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "extproc", "demo", "--batch", "--pods", "2", "--requests", "40", "--batch-lines", "120", "--time-scale", "0.05", "--report", str(rep)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(rep.read_text())
    b = r["batch"]
    assert (b["total"], b["completed"], b["failed"]) == (120, 120, 0) and b["status"] == "completed" and b["each_custom_id_once"]
    assert r["ok"] == r["requests"] == 40 and r["config"] == "batch-interactive"
