"""Re-render the plain-envoy overlay's Envoy ConfigMap from `extproc envoy-config` (run after changing the renderer).

    .venv/bin/python scripts/render_manifest_envoy.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CM = Path(__file__).resolve().parent.parent / "manifests/overlays/plain-envoy/envoy-configmap.yaml"


def main() -> int:
    lines = CM.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "extproc envoy-config" in line)
    flags = lines[first].split("extproc envoy-config", 1)[1].rstrip(" \\") + " " + lines[first + 1].lstrip("# ")
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", *flags.split(), "--no-validate"], capture_output=True, text=True, check=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("  envoy.yaml: |"))
    body = ["    " + line if line else "" for line in out.stdout.rstrip("\n").splitlines()]
    CM.write_text("\n".join(lines[: start + 1] + body) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
