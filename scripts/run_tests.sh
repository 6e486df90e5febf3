#!/usr/bin/env bash
# Runs the pytest suite (or the selection given as arguments) from the project venv. Any non-zero pytest exit
# fails, including 5 (the selection collected no tests: a typo in a path or marker must not pass silently).
# Under CI (CI set; .ci/run sets it) a test that skips because a prerequisite is missing fails instead
# (tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
"$VENV/bin/python" -m pytest -q -rs --timeout=600 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests for this selection (exit 5): failing" >&2
fi
exit "$rc"
