"""SaturationDetector.headroom: the batch band's free slots that the scheduler reports on batch answers."""

import time

from extproc.admission.saturation import SaturationDetector
from extproc.datalayer.endpoint import EndpointPool, PodMetrics


def _pool(n: int) -> EndpointPool:
    p = EndpointPool()
    p.set_endpoints([f"p{i}:1" for i in range(n)])
    return p


def test_headroom_counts_free_slots_below_the_per_pod_limit() -> None:
    pool = _pool(3)
    a, b, c = pool.snapshot()
    det = SaturationDetector(queue_depth_threshold=1, max_inflight_per_pod=4)
    now = time.monotonic()
    assert det.headroom(pool.snapshot(), now) == 12
    for _ in range(3):
        a.add_inflight(10)
    for _ in range(6):  # over the limit (interactive requests may go above it): counts 0, never negative
        b.add_inflight(10)
    assert det.headroom(pool.snapshot(), now) == 1 + 0 + 4
    # a pod saturated by fresh metrics has no room, whatever our own count says; stale metrics are unknown
    c.set_metrics(PodMetrics(waiting=2, kv_usage=0.1, updated_at=now))
    assert det.headroom(pool.snapshot(), now) == 1
    c.set_metrics(PodMetrics(waiting=2, kv_usage=0.1, updated_at=now - 60))
    assert det.headroom(pool.snapshot(), now) == 5
    c.healthy = False
    assert det.headroom(pool.snapshot(), now) == 1
    # consistent with saturated(): no headroom exactly when every healthy pod is saturated
    a.add_inflight(10)
    assert det.headroom(pool.snapshot(), now) == 0 and det.saturated(pool.snapshot(), now)
    a.release_inflight()
    assert det.headroom(pool.snapshot(), now) == 1 and not det.saturated(pool.snapshot(), now)


def test_no_inflight_limit_means_no_slot_count() -> None:
    assert SaturationDetector().headroom(_pool(2).snapshot()) is None
