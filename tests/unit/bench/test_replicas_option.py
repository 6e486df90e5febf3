"""``extproc bench --replicas 1,2,3``: every extproc setup once per replica count, side by side."""

from __future__ import annotations

import pytest

from extproc.bench.overhead import variant_replicas
from extproc.bench.setups import parse_setups, with_replicas


def test_each_extproc_setup_runs_at_each_count() -> None:
    out = with_replicas(parse_setups("envoy-rr,extproc-prefix-load,extproc-precise"), [1, 2, 3])
    assert [(s.name, s.replicas) for s in out] == [
        ("envoy-rr", 1),
        ("extproc-prefix-load", 1), ("extproc-prefix-load@r2", 2), ("extproc-prefix-load@r3", 3),
        ("extproc-precise", 1), ("extproc-precise@r2", 2), ("extproc-precise@r3", 3),
    ]  # fmt: skip
    assert all(s.kv_events for s in out if s.name.startswith("extproc-precise"))
    assert [s.name for s in with_replicas(parse_setups("extproc-default"), [2])] == ["extproc-default@r2"]
    with pytest.raises(ValueError):
        with_replicas(parse_setups("extproc-default"), [0])


def test_overhead_replica_variants() -> None:
    assert variant_replicas("extproc-observability-r2") == 2 and variant_replicas("extproc-observability-r3") == 3
    assert variant_replicas("extproc-observability") == 1 and variant_replicas("extproc-none-grpcio") == 1


def test_virtual_rejects_replicas(tmp_path: object) -> None:
    import argparse

    from extproc.bench.cli import add_arguments, run_bench

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--virtual", "--replicas", "1,2", "--setups", "extproc-default", "--out", str(tmp_path)])
    assert run_bench(args) == 2
