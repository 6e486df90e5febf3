"""The test runner's own rules: an empty selection fails, and under CI a skip is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_inner.py"
    test.write_text(
        "import pytest\n"
        "def test_needs_a_tool():\n    pytest.skip('tool not installed')\n"
        "@pytest.mark.xfail(reason='known', strict=True)\ndef test_known_bug():\n    assert False\n"
        "def test_fine():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT / "tests")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_skip_is_a_failure_under_ci_only(tmp_path: Path) -> None:
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "1 passed, 1 skipped, 1 xfailed" in local.stdout, local.stdout
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 passed, 1 xfailed" in ci.stdout and "skipped under CI" in ci.stdout, ci.stdout


def test_run_tests_fails_when_the_selection_collects_nothing() -> None:
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/run_tests.sh"), "tests/unit/test_test_hygiene.py", "-k", "no_such_test_anywhere"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "VENV": str(Path(sys.executable).parent.parent)},
    )  # fmt: skip
    assert r.returncode == 5, r.stdout + r.stderr
    assert "collected no tests" in r.stderr
