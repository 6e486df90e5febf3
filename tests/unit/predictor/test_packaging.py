"""The warm-start model ships as package data: in the wheel (and so in the image, which installs only wheels)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODEL = "extproc/predictor/data/latency-predictor.json"


def test_wheel_contains_the_warm_start_model(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, cwd=tmp_path, capture_output=True, timeout=300,
    )
    (whl,) = tmp_path.glob("extproc-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert MODEL in names
    assert zipfile.ZipFile(whl).getinfo(MODEL).file_size == (ROOT / MODEL).stat().st_size


def test_image_build_context_keeps_the_model() -> None:
    """.dockerignore: the last pattern matching the model path (Docker's rule) must be a re-include."""
    import fnmatch

    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    keep = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        parts = MODEL.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(x, pat.rstrip("/")) for x in prefixes) or fnmatch.fnmatch(MODEL, pat):
            keep = neg
    assert keep, "the warm-start model is excluded from the image build context"
    assert "COPY extproc ./extproc" in (ROOT / "Dockerfile").read_text()
