#!/usr/bin/env bash
# Create the aiperf virtual environment used by `extproc bench --aiperf` and tests/integration/test_bench_aiperf.py.
#
# aiperf (the NVIDIA AI-Dynamo load generator, PyPI `aiperf`) pins its own versions of pydantic, zmq, numpy and
# friends, so it lives in its own venv instead of the project venv. `extproc bench` finds it at
# <repo>/.venv-aiperf/bin/aiperf (or EXTPROC_AIPERF=/path/to/aiperf).
#
# Idempotent: a stamp file inside the venv records a successful install; re-running is a no-op unless
# AIPERF_FORCE=1. Non-interactive (safe under CI=true with no stdin).
#
# Environment:
#   AIPERF_VENV     venv path (default: <repo>/.venv-aiperf, gitignored by `.venv-*/`)
#   AIPERF_PYTHON   interpreter used to create the venv (default: python3.11, then python3)
#   AIPERF_FORCE    1 = reinstall even if the stamp exists
set -euo pipefail

AIPERF_VERSION="0.13.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AIPERF_VENV:-${repo_root}/.venv-aiperf}"
stamp="${venv}/.aiperf_setup.stamp"
stamp_content="aiperf==${AIPERF_VERSION}"

log() { printf '[aiperf_setup] %s\n' "$*" >&2; }

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${stamp_content}" && "${AIPERF_FORCE:-0}" != "1" ]]; then
  log "already set up: ${venv} (${stamp_content}); set AIPERF_FORCE=1 to reinstall"
  exit 0
fi

python_bin="${AIPERF_PYTHON:-}"
if [[ -z "${python_bin}" ]]; then
  for cand in python3.11 python3; do
    if command -v "${cand}" >/dev/null 2>&1; then python_bin="$(command -v "${cand}")"; break; fi
  done
fi
if [[ -z "${python_bin}" ]]; then
  log "no python3 interpreter found"; exit 1
fi

if [[ ! -x "${venv}/bin/python" ]]; then
  log "creating ${venv} with ${python_bin}"
  "${python_bin}" -m venv "${venv}"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"${venv}/bin/python" -m pip install -q --upgrade pip
log "installing ${stamp_content}"
"${venv}/bin/python" -m pip install -q "${stamp_content}"
"${venv}/bin/aiperf" --version >/dev/null 2>&1 || "${venv}/bin/aiperf" --help >/dev/null
printf '%s' "${stamp_content}" > "${stamp}"
log "ready: ${venv}/bin/aiperf"
