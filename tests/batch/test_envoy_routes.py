"""``extproc envoy-config --batch HOST:PORT``: /v1/files and /v1/batches go to the batch service, past ext_proc."""

from __future__ import annotations

import json
import subprocess
import sys

from extproc.envoy_config import BATCH_CLUSTER, render_bootstrap, render_include, validate_bootstrap


def _routes(cfg: dict) -> list[dict]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def test_batch_routes_come_first_and_disable_ext_proc() -> None:
    cfg = render_bootstrap(listen="127.0.0.1:0", extproc="127.0.0.1:9002", batch="127.0.0.1:8090")
    validate_bootstrap(cfg)
    routes = _routes(cfg)
    assert [r["match"].get("path_separated_prefix") for r in routes[:2]] == ["/v1/files", "/v1/batches"]
    for r in routes[:2]:
        assert r["route"]["cluster"] == BATCH_CLUSTER
        assert {k: v["disabled"] for k, v in r["typed_per_filter_config"].items()} == {"extproc": True, "extproc-observe": True}
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    ep = clusters[BATCH_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (ep["address"], ep["port_value"]) == ("127.0.0.1", 8090)
    # without --batch nothing changes
    plain = render_bootstrap(listen="127.0.0.1:0", extproc="127.0.0.1:9002")
    assert BATCH_CLUSTER not in {c["name"] for c in plain["static_resources"]["clusters"]}
    assert all("path_separated_prefix" not in r["match"] for r in _routes(plain))


def test_include_and_envoy_only_and_cli() -> None:
    inc = render_include(extproc="127.0.0.1:9002", batch="10.0.0.5:8090")
    assert inc["routes"][0]["route"]["cluster"] == BATCH_CLUSTER
    only = render_bootstrap(listen="127.0.0.1:0", endpoints="127.0.0.1:8000", batch="127.0.0.1:8090")
    validate_bootstrap(only)
    assert "typed_per_filter_config" not in _routes(only)[0] or not _routes(only)[0]["typed_per_filter_config"]
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--extproc", "127.0.0.1:9002", "--batch", "127.0.0.1:8090", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _routes(json.loads(out.stdout))[1]["match"]["path_separated_prefix"] == "/v1/batches"
    bad = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--extproc", "127.0.0.1:9002", "--batch", "nope", "--no-validate"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "envoy-config:" in bad.stderr
