#!/usr/bin/env bash
# Install the command-line tools the tests drive, from Debian's packages, when they are missing:
#   wrk   load generator of the overhead benchmark and its test (tests/unit/bench/test_overhead.py)
#   curl  the gateway's error replies are read with curl (tests/reliability/test_gateway_errors.py)
#   redis-server  the shared store of active-active scheduler replicas (tests/reliability/test_active_active.py,
#                 extproc demo/bench --replicas); Debian package redis-server
# Idempotent; non-interactive. Needs root (or sudo) only when something is missing.
set -euo pipefail
log() { printf '[system_deps] %s\n' "$*" >&2; }
missing=()
for tool in wrk curl redis-server; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
  log "already installed: wrk curl redis-server"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { log "missing ${missing[*]} and this is not root (no sudo): install the Debian packages ${missing[*]}"; exit 1; }
  SUDO="sudo -n"
fi
log "installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for tool in "${missing[@]}"; do
  command -v "$tool" >/dev/null || { log "$tool installed but not on PATH"; exit 1; }
done
log "installed: ${missing[*]}"
