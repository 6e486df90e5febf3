import pytest

from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.scheduling.config import ConfigError, build_config
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.inflight_limit import InflightLimitFilter


def _pool(n=3):
    p = EndpointPool(default_models=frozenset({"m"}))
    p.set_endpoints([f"10.0.0.{i}:8000" for i in range(n)])
    return p


def _req():
    return parse_request("/v1/completions", b'{"model":"m","prompt":"x"}')


def test_drops_pods_at_the_cap_and_keeps_all_when_everyone_is():
    pool = _pool()
    eps = list(pool.snapshot())
    f = InflightLimitFilter(max_inflight=2)
    eps[0].inflight = 2
    eps[1].inflight = 1
    assert f.filter(CycleState(), _req(), eps) == eps[1:]
    for e in eps:
        e.inflight = 5
    assert f.filter(CycleState(), _req(), eps) == eps  # never filters to empty: admission decides


def test_config_requires_max_inflight():
    pool = _pool()
    raw = {"plugins": [{"type": "inflight-limit-filter"}], "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "inflight-limit-filter"}]}]}
    with pytest.raises(ConfigError, match="maxInflight"):
        build_config(raw, pool)
    raw["plugins"][0]["parameters"] = {"maxInflight": 0}
    with pytest.raises(ConfigError):
        build_config(raw, pool)


def test_burst_with_shared_prefix_is_bounded_per_pod():
    """Prefix affinity pulls every request to one pod; the cap spreads the burst without waiting for a scrape."""
    pool = _pool(4)
    raw = {
        "plugins": [
            {"type": "inflight-limit-filter", "parameters": {"maxInflight": 5}},
            {"type": "queue-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "prefix-cache-scorer"},
        ],
        "schedulingProfiles": [
            {
                "name": "p",
                "plugins": [
                    {"pluginRef": "inflight-limit-filter"},
                    {"pluginRef": "queue-scorer", "weight": 2},
                    {"pluginRef": "kv-cache-utilization-scorer", "weight": 2},
                    {"pluginRef": "prefix-cache-scorer", "weight": 3},
                ],
            }
        ],
    }
    sched = build_config(raw, pool).scheduler
    prefix = "shared system prompt " * 50
    per_pod: dict[str, int] = {}
    for i in range(20):
        req = parse_request("/v1/completions", ('{"model":"m","prompt":"%s q%d"}' % (prefix, i)).encode())
        res, cyc = sched.schedule(req)
        sched.dispatched(cyc, req, res)
        res.primary.inflight += 1  # what the server's flight tracker does on dispatch
        per_pod[res.primary.address] = per_pod.get(res.primary.address, 0) + 1
    assert max(per_pod.values()) == 5 and len(per_pod) == 4
