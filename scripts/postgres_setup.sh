#!/usr/bin/env bash
# Install the PostgreSQL server from Debian's packages when it is missing: the batch service's shared store is
# tested against a real server (tests/batch/conftest.py starts one from /usr/lib/postgresql/*/bin).
# Idempotent; non-interactive. Needs root (or sudo) only when something is missing.
set -euo pipefail
log() { printf '[postgres_setup] %s\n' "$*" >&2; }
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  log "already installed: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { log "PostgreSQL is missing and this is not root (no sudo): install the 'postgresql' package"; exit 1; }
  SUDO="sudo -n"
fi
log "installing postgresql (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# the package's own cluster is not needed (tests run their own server in a temporary directory)
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { log "postgresql installed but initdb not found"; exit 1; }
log "installed: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
