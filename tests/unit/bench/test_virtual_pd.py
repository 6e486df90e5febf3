"""Virtual-time P/D: the same scheduler plugins split requests; prefill legs on prefill pods, decode on decode pods,
KV transfer time on TTFT, transfer failures per kv_load_failure_policy."""

from __future__ import annotations

import pytest

from extproc.bench import virtual
from extproc.bench.setups import SETUPS
from extproc.bench.workloads import generate, parse_stages


@pytest.fixture(scope="module")
def wl():  # type: ignore[no-untyped-def]
    return generate("pd", parse_stages("10:3"), seed=1)


def test_pd_splits_and_serves_on_decode_pods(wl) -> None:  # type: ignore[no-untyped-def]
    fl = virtual.layout("8").split(6)
    roles = {a: r for (_, a), r in zip(fl.pods, fl.roles)}
    vr = virtual.run_virtual(wl, SETUPS["extproc-pd"], fl, seed=1)
    assert len(vr.results) == len(wl.requests) and all(r.ok for r in vr.results)
    split = [r for r in vr.results if r.prefill_pod]
    assert len(split) > 0.8 * len(vr.results)  # cold ~5k-token prompts: nonCachedTokens 256 splits them
    assert all(roles[r.pod] == "decode" for r in vr.results)
    assert all(roles[r.prefill_pod] == "prefill" for r in split)


def test_tcp_link_costs_ttft(wl) -> None:  # type: ignore[no-untyped-def]
    def ttft(link: str) -> float:
        fl = virtual.layout("8", link=link).split(6)
        rs = virtual.run_virtual(wl, SETUPS["extproc-pd"], fl, seed=1).results
        return sorted(r.ttft_ms for r in rs)[len(rs) // 2]

    # ~5k tokens x 128 KiB = 655 MB: ~17 ms over RDMA 400G, ~265 ms over TCP 25G
    assert ttft("tcp-25g") - ttft("rdma-400g") > 150


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_transfer_failures(wl, policy: str) -> None:  # type: ignore[no-untyped-def]
    fl = virtual.layout("8", kv_failure_rate=1.0, kv_load_failure_policy=policy).split(6)
    rs = virtual.run_virtual(wl, SETUPS["extproc-pd"], fl, seed=1).results
    split = [r for r in rs if r.prefill_pod or r.status == 500]
    assert split
    if policy == "fail":
        assert all(r.status == 500 and not r.ok for r in split)
    else:
        assert all(r.ok for r in rs)


def test_aggregated_setup_ignores_roles(wl) -> None:  # type: ignore[no-untyped-def]
    vr = virtual.run_virtual(wl, SETUPS["extproc-default"], virtual.layout("8"), seed=1)
    assert all(r.ok and not r.prefill_pod for r in vr.results)
    assert len({r.pod for r in vr.results}) > 4


def test_pd_predicted_learns_both_legs_from_cold() -> None:
    """extproc-pd-predicted: every split request trains the prefill-leg head (prefill pod's row) and the
    after-prefill head (decode pod's row); once a model exists both legs are predicted online."""
    wl = generate("pd", parse_stages("20:15"), seed=2)
    fl = virtual.layout("8").split(4)
    vr = virtual.run_virtual(wl, SETUPS["extproc-pd-predicted"], fl, seed=2)
    assert all(r.ok for r in vr.results)
    split = sum(1 for r in vr.results if r.prefill_pod)
    assert split > 0.9 * len(vr.results)
    rep = vr.extra["predictor"]
    assert rep["warm_start"] is None and rep["retrains"] >= 1
    assert rep["prefill_leg_samples"] == split and rep["decode_leg_samples"] == split
    for k in ("online_prefill_leg_mape", "online_ttft_after_prefill_mape", "online_pd_ttft_mape"):
        assert rep[k] is not None and 0.0 < rep[k] < 0.3, (k, rep[k])
    assert rep["online_ttft_mape"] is None  # no aggregated request: nothing trained as one
