#!/usr/bin/env bash
# System (Debian) packages the test tiers need: `wrk` (Debian's `wrk` package, the overhead benchmark's load
# generator; tests/unit/bench/test_overhead.py fails under CI=true without it). Idempotent: nothing is
# installed when every binary is already on PATH. Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [[ ${#need[@]} -eq 0 ]]; then
  exit 0
fi
echo "[system_packages] installing: ${need[*]}" >&2
SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}"
}
command -v wrk >/dev/null
