"""batch-reserve-filter (batch requests never go to the pods kept free of batch) and batch-free-scorer
(interactive requests prefer them), alone and in the shipped batch-interactive config."""

import pytest

from extproc.scheduling.reservation import BATCH_RESERVATION, BatchReservation
from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.scheduling.config import ConfigError, build_config, load_config
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.batch_free import BatchFreeScorer
from extproc.scheduling.plugins.batch_reserve import BatchReserveFilter
from extproc.services import Services


def _pool(n: int = 4) -> EndpointPool:
    p = EndpointPool(default_models=frozenset({"m"}))
    p.set_endpoints([f"10.0.0.{i}:8000" for i in range(n)])
    return p


def _req(priority: int, prompt: str = "x"):
    body = ('{"model":"m","prompt":"%s","max_tokens":4}' % prompt).encode()
    return parse_request("/v1/completions", body, {"x-gateway-inference-priority": str(priority)})


def test_filter_keeps_batch_off_the_reserved_pods_only() -> None:
    eps = list(_pool().snapshot())
    f = BatchReserveFilter(reserved_pods=1)
    assert f.filter(CycleState(), _req(-1), eps) == eps[1:]
    assert f.filter(CycleState(), _req(0), eps) == eps  # interactive: every pod
    eps[1].inflight_batch = 3
    eps[2].inflight_batch = 3
    assert f.filter(CycleState(), _req(-1), eps) == [eps[1], eps[2], eps[3]]
    assert BatchReserveFilter(reserved_pods=2).filter(CycleState(), _req(-1), eps) == [eps[1], eps[2]]
    assert BatchReserveFilter(reserved_pods=0).filter(CycleState(), _req(-1), eps) == eps
    other = list(_pool(2).snapshot())
    for e in other:
        e.models = frozenset({"other"})
    # only the model's pods are ranked: another model's idle pod is not this model's reserve
    assert f.filter(CycleState(), _req(-1), [*other, *eps]) == eps[1:]


def test_scorer_prefers_batch_free_pods_for_interactive_only() -> None:
    eps = list(_pool(3).snapshot())
    eps[1].inflight_batch = 1
    eps[2].inflight_batch = 13
    eps[0].inflight = 7  # interactive load is not batch work
    s = BatchFreeScorer()
    assert s.score(CycleState(), _req(0), eps) == [1.0, 0.5, 1.0 / 14]
    assert s.score(CycleState(), _req(-1), eps) == [1.0, 1.0, 1.0]


def _raw(*filters: dict) -> dict:
    plugins = [*filters, {"type": "max-score-picker"}]
    return {"plugins": plugins, "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": p.get("name", p["type"])} for p in plugins]}]}


def test_config_registers_the_reservation_once_with_its_default() -> None:
    services = Services()
    build_config(_raw({"type": "batch-reserve-filter"}), _pool(), services)
    assert services[BATCH_RESERVATION] == BatchReservation(1)
    services = Services()
    build_config(_raw({"type": "batch-reserve-filter", "parameters": {"reservedPods": 2}}), _pool(), services)
    assert services[BATCH_RESERVATION].reserved_pods == 2
    with pytest.raises(ConfigError, match="reservedPods"):
        build_config(_raw({"type": "batch-reserve-filter", "parameters": {"reservedPods": -1}}), _pool(), Services())
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_config(_raw({"type": "batch-reserve-filter", "parameters": {"pods": 1}}), _pool(), Services())
    with pytest.raises(ConfigError, match="differs"):
        build_config(
            _raw({"type": "batch-reserve-filter", "name": "a"}, {"type": "batch-reserve-filter", "name": "b", "parameters": {"reservedPods": 2}}),
            _pool(), Services(),
        )  # fmt: skip


def test_batch_interactive_config_routes_interactive_to_the_batch_free_pod() -> None:
    pool = _pool(4)
    services = Services()
    cfg = load_config("batch-interactive", pool, services)
    assert services[BATCH_RESERVATION] == BatchReservation(1)
    eps = list(pool.snapshot())
    for e in eps:
        e.models = frozenset({"m"})
    # batch fills pods 1–3; pod 0 (lowest address) is kept free
    for i in range(12):
        result, _ = cfg.scheduler.schedule(_req(-1, f"batch line {i}"))
        assert result.primary is not eps[0]
        result.primary.add_inflight(10, batch=True)
    assert eps[0].inflight_batch == 0 and sum(e.inflight_batch for e in eps) == 12
    # interactive requests go to the pod free of batch, whatever the load scorers say about it
    for i in range(5):
        result, _ = cfg.scheduler.schedule(_req(10, f"chat turn {i}"))
        assert result.primary is eps[0]
        result.primary.add_inflight(10)
