"""Suite-wide rule: under CI (``CI`` set to anything but empty/0/false/no; ``.ci/run`` sets it) a skipped test
fails. Tests skip only when a prerequisite is missing (the Envoy binary, the real-vLLM venv, aiperf, wrk,
curl, hadolint); ``make test`` installs all of them, so in CI a skip means the setup is broken and must not
pass silently. Expected failures (xfail) are not skips and are left alone."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and ci_enabled():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI={os.environ.get('CI')!r}), which is a failure here: {reason}"
