"""A real third-party package (tests/fixtures/thirdparty_scorer) installed with pip and discovered through the
``extproc.plugins`` entry-point group, then used from a YAML config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.scheduling import registry
from extproc.scheduling.config import ConfigError, load_config

from plugin_testlib import MODEL, make_request

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "thirdparty_scorer"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the fixture package (once per module) into a private target directory."""
    tmp = tmp_path_factory.mktemp("thirdparty")
    src = tmp / "src"  # build from a copy so setuptools' build/ and egg-info never land in the repository
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (site / "thirdparty_scorer" / "__init__.py").exists()
    return site


@pytest.fixture
def installed_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Put the installed package on sys.path for one test; restore the registry afterwards."""
    saved = dict(registry.PLUGIN_TYPES)
    monkeypatch.syspath_prepend(str(plugin_site))  # also invalidates importlib caches
    try:
        yield plugin_site
    finally:
        registry.PLUGIN_TYPES.clear()
        registry.PLUGIN_TYPES.update(saved)
        sys.modules.pop("thirdparty_scorer", None)


def _pool() -> EndpointPool:
    pool = EndpointPool(default_models=frozenset({MODEL}))
    pool.set_endpoints([f"10.0.0.{i}:8000" for i in range(4)])
    for i, e in enumerate(pool.snapshot()):
        e.metrics = PodMetrics(waiting=i * 10)  # queue-scorer alone prefers 10.0.0.0
    return pool


def test_entry_point_plugin_changes_the_pick(installed_plugin: Path, tmp_path: Path) -> None:
    loaded = registry.load_entry_points(force=True)
    assert loaded.get("constant-scorer") == "thirdparty_scorer:ConstantScorer"
    assert "constant-scorer" in registry.PLUGIN_TYPES

    cfg_path = tmp_path / "thirdparty.yaml"
    cfg_path.write_text(
        """
plugins:
  - type: queue-scorer
  - type: constant-scorer
    name: favour-pod-3
    parameters: {value: 1.0, addresses: ["10.0.0.3:8000"]}
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 1
      - pluginRef: favour-pod-3
        weight: 5
"""
    )
    pool = _pool()
    sched = load_config(str(cfg_path), pool).scheduler
    for _ in range(20):
        result, _cycle = sched.schedule(make_request())
        assert result.primary.address == "10.0.0.3:8000"
        assert result.profile_results["default"].scores["10.0.0.3:8000"] == pytest.approx(5.0)

    # Weight 0 switches its effect off: the queue scorer decides again.
    cfg_path.write_text(cfg_path.read_text().replace("weight: 5", "weight: 0"))
    sched = load_config(str(cfg_path), pool).scheduler
    assert sched.schedule(make_request())[0].primary.address == "10.0.0.0:8000"


def test_entry_point_plugin_parameter_errors_name_file_and_plugin(installed_plugin: Path, tmp_path: Path) -> None:
    registry.load_entry_points(force=True)
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(
        """
plugins:
  - type: constant-scorer
    name: favour
    parameters: {value: 7}
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: favour
"""
    )
    with pytest.raises(ConfigError) as ei:
        load_config(str(cfg_path), _pool())
    assert ei.value.path == str(cfg_path)
    assert ei.value.plugin == "favour"
    assert "must be a number in [0, 1]" in ei.value.reason
