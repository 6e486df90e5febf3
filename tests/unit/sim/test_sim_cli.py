from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

pytestmark = pytest.mark.timeout(60)


def test_cli_prints_json_line_and_exits_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "sim", "--pods", "2", "--fleet", "tiny-cpu:1,llama3-8b-l40s:1",
         "--kv-events", "--kv-blocks", "64", "--time-scale", "0.01", "--lora", "a"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert len(line["endpoints"]) == 2
        assert {v["accelerator"] for v in line["labels"].values()} == {"cpu-1-core", "L40S-48GB"}
        for ep in line["endpoints"]:
            kv = line["kv_events"][ep]
            assert kv["endpoint"].startswith("tcp://127.0.0.1:") and kv["topic"] == f"kv@{ep}@sim-llama"
            with urllib.request.urlopen(f"http://{ep}/health", timeout=5) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_unknown_profile() -> None:
    r = subprocess.run([sys.executable, "-m", "extproc", "sim", "--profile", "nope"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "unknown profile" in r.stderr
