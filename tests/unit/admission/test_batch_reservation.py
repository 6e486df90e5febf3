"""scheduling.reservation: the pods kept free of batch work, and how the shed check, the headroom count and the
flight tracker use it."""

import time

import pytest

from extproc.scheduling.reservation import DEFAULT_RESERVED_PODS, BatchReservation
from extproc.admission.saturation import SaturationDetector
from extproc.api import parse_request
from extproc.datalayer.endpoint import EndpointPool
from extproc.server.decide import batch_candidates, shed_error
from extproc.server.tracker import FlightTracker


def _pool(n: int) -> EndpointPool:
    p = EndpointPool(default_models=frozenset({"m"}))
    p.set_endpoints([f"10.0.0.{i}:8000" for i in range(n)])
    return p


def _req(priority: int):
    return parse_request("/v1/completions", b'{"model":"m","prompt":"x","max_tokens":4}', {"x-gateway-inference-priority": str(priority)})


def test_reserves_the_pods_with_the_fewest_batch_lines_ties_by_address() -> None:
    eps = list(_pool(4).snapshot())
    r = BatchReservation(1)
    assert r.reserved(eps) == [eps[0]]  # idle fleet: the lowest address
    assert r.batch_pods(eps) == eps[1:]
    # batch fills the other pods: the reserved one stays reserved (nothing ranks before a pod with 0 batch)
    for e in eps[1:]:
        e.inflight_batch = 5
    eps[3].inflight_batch = 0  # a batch pod drains to 0: the address still decides for eps[0]
    assert r.reserved(eps) == [eps[0]]
    # interactive work on the reserved pod does not count: only batch lines do
    eps[0].inflight = 9
    assert r.reserved(eps) == [eps[0]]
    # a reserved pod that holds batch (e.g. picked up before it was reserved) loses to a pod with less
    eps[0].inflight_batch = 2
    assert r.reserved(eps) == [eps[3]]
    assert r.batch_pods(eps) == eps[:3]
    assert BatchReservation(2).reserved(eps) == [eps[3], eps[0]]


def test_unhealthy_pods_are_never_reserved_and_one_pod_is_always_left_to_batch() -> None:
    eps = list(_pool(3).snapshot())
    r = BatchReservation(1)
    eps[0].healthy = False
    assert r.reserved(eps) == [eps[1]]  # the next one takes the place of the pod that left
    eps[2].removed = True
    assert r.reserved(eps) == []  # one healthy pod: it stays a batch pod
    assert r.batch_pods(eps) == eps
    eps = list(_pool(2).snapshot())
    assert BatchReservation(5).batch_pods(eps) == [eps[1]]
    assert BatchReservation(0).batch_pods(eps) == eps
    with pytest.raises(ValueError):
        BatchReservation(-1)
    assert BatchReservation().reserved_pods == DEFAULT_RESERVED_PODS == 1


def test_shed_and_headroom_count_only_the_pods_batch_may_use() -> None:
    pool = _pool(2)
    a, b = pool.snapshot()
    det = SaturationDetector(queue_depth_threshold=1, max_inflight_per_pod=4)
    r = BatchReservation(1)
    now = time.monotonic()
    assert det.headroom(batch_candidates(pool, "m", r), now) == 4  # b only
    assert det.headroom(batch_candidates(pool, "m", None), now) == 8
    for _ in range(4):
        b.add_inflight(10, batch=True)
    # a (reserved, idle) is not room for batch: shed, where without the reservation a would admit it
    err = shed_error(pool, det, _req(-1), reservation=r)
    assert err is not None and err.status == 429 and err.code == "saturated"
    assert shed_error(pool, det, _req(-1)) is None
    assert shed_error(pool, det, _req(0), reservation=r) is None  # never sheds non-sheddable work
    assert det.headroom(batch_candidates(pool, "m", r), now) == 0


def test_tracker_counts_batch_lines_per_pod() -> None:
    pool = _pool(1)
    (e,) = pool.snapshot()
    t = FlightTracker(lambda req, obs: None)
    fb = t.dispatch(_req(-1), e)
    fi = t.dispatch(_req(5), e)
    assert (e.inflight, e.inflight_batch) == (2, 1)
    fb.on_response_headers(200)
    fb.on_body_chunk(b"data: x\n\n", time.monotonic())  # leaves prefill: the decode-phase release path
    t.finish(fb, "ok")
    assert (e.inflight, e.inflight_batch) == (1, 0)
    t.finish(fi, "ok")
    assert (e.inflight, e.inflight_batch) == (0, 0)
    t.finish(fb, "ok")  # finishing twice changes nothing
    assert e.inflight_batch == 0
