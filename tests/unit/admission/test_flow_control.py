import asyncio
import json
import time

import pytest

from extproc.admission.flow_control import FlowControlConfig, FlowController
from extproc.admission.saturation import SaturationDetector
from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool, PodMetrics
from extproc.scheduling.framework import SchedulingError


def req(prio=0, tenant="", model="m", i=0):
    h = {"x-gateway-inference-priority": str(prio), "x-gateway-inference-fairness-id": tenant}
    return parse_request("/v1/completions", json.dumps({"model": model, "prompt": f"p{i}"}).encode(), h)


@pytest.fixture
def pool():
    p = EndpointPool(default_models=frozenset({"m"}))
    p.set_endpoints(["a:1"])
    return p


def saturate(pool, on=True):
    for ep in pool.snapshot():
        ep.metrics = PodMetrics(waiting=20 if on else 0, kv_usage=0.95 if on else 0.1, updated_at=time.monotonic())


def fc(pool, **kw):
    cfg = FlowControlConfig(enabled=True, tick_s=0.01, **kw)
    return FlowController(cfg, SaturationDetector(), lambda model: [e for e in pool.snapshot() if model in e.models])


async def test_not_saturated_no_wait(pool):
    f = fc(pool)
    saturate(pool, False)
    assert not f.must_wait(req())
    saturate(pool, True)
    assert f.must_wait(req())
    assert not f.must_wait(req(prio=-1))  # sheddable never queues (it is shed with 429)


async def test_priority_then_fairness_order(pool):
    f = fc(pool)
    saturate(pool, True)
    order = []

    async def one(r, tag):
        await f.wait(r)
        order.append(tag)

    tasks = [
        asyncio.create_task(one(req(0, "t1", i=1), "low-t1-1")),
        asyncio.create_task(one(req(0, "t1", i=2), "low-t1-2")),
        asyncio.create_task(one(req(0, "t2", i=3), "low-t2-1")),
        asyncio.create_task(one(req(5, "t3", i=4), "high")),
    ]
    await asyncio.sleep(0.05)
    assert order == [] and f.queued() == 4
    saturate(pool, False)
    for _ in range(4):  # one release per notify (as the handler chains them after each dispatch)
        f.notify()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["high", "low-t1-1", "low-t2-1", "low-t1-2"]  # tenants alternate within a band


async def test_ttl_expiry_is_503(pool):
    f = fc(pool, queue_ttl_s=0.05)
    saturate(pool, True)
    with pytest.raises(SchedulingError) as ei:
        await f.wait(req())
    assert ei.value.status == 503 and ei.value.code == "queue_timeout"
    assert f.queued() == 0 and f.expired == 1


async def test_full_band_is_429(pool):
    f = fc(pool, max_queue_per_band=1)
    saturate(pool, True)
    t = asyncio.create_task(f.wait(req(i=1)))
    await asyncio.sleep(0.01)
    with pytest.raises(SchedulingError) as ei:
        await f.wait(req(i=2))
    assert ei.value.status == 429 and ei.value.code == "queue_full"
    saturate(pool, False)
    await asyncio.wait_for(t, 2)  # the ticker releases it without any other event
    await f.stop()


async def test_cancelled_waiter_leaves_queue(pool):
    f = fc(pool)
    saturate(pool, True)
    t = asyncio.create_task(f.wait(req()))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert f.queued() == 0
    await f.stop()


async def test_bands_of_client_priorities_do_not_accumulate(pool):
    """Priorities come from a client header: every band that empties is dropped (released, expired, cancelled)."""
    f = fc(pool, queue_ttl_s=0.05)
    saturate(pool, True)
    expired = await asyncio.gather(*(f.wait(req(prio=p, i=p)) for p in range(1, 51)), return_exceptions=True)
    assert all(isinstance(e, SchedulingError) and e.status == 503 for e in expired)
    t = asyncio.create_task(f.wait(req(prio=77)))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    f2 = fc(pool)
    released = [asyncio.create_task(f2.wait(req(prio=p, i=p))) for p in range(100, 110)]
    await asyncio.sleep(0.01)
    saturate(pool, False)
    for _ in range(10):
        f2.notify()
        await asyncio.sleep(0)
    await asyncio.gather(*released)
    assert f._bands == {} and f2._bands == {} and f.queued() == f2.queued() == 0
    await f.stop()
    await f2.stop()


def test_config_validation():
    assert not FlowControlConfig.from_config({}).enabled
    with pytest.raises(ValueError):
        FlowControlConfig.from_config({"enabled": "yes"})
    with pytest.raises(ValueError):
        FlowControlConfig.from_config({"enabled": True, "queueTtlSeconds": 0})


async def test_separate_gate_keeps_headroom_for_non_sheddable(pool):
    """flowControl.saturationDetector: batch is shed at the main detector's limit, interactive queues only at the gate's."""
    cfg = FlowControlConfig.from_config({"enabled": True, "saturationDetector": {"maxInflightPerPod": 8}})
    main = SaturationDetector(max_inflight_per_pod=6)
    f = FlowController(cfg, main, lambda model: [e for e in pool.snapshot() if model in e.models])
    ep = pool.get("a:1")
    ep.metrics = PodMetrics(updated_at=time.monotonic())
    ep.inflight = 6
    assert main.saturated(pool.snapshot())  # batch would be shed here ...
    assert not f.must_wait(req())  # ... while interactive still goes straight through
    ep.inflight = 8
    assert f.must_wait(req())
    with pytest.raises(ValueError):
        FlowControlConfig.from_config({"enabled": True, "saturationDetector": {"maxInflightPerPod": -1}})
