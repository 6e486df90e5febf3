from __future__ import annotations

import math

import numpy as np
import pytest

from extproc.datalayer.endpoint import PodMetrics
from extproc.predictor.features import (
    CHUNK_AGE_CAP_MS,
    FEATURE_NAMES,
    LORA_COLD,
    LORA_NONE,
    LORA_SLOTS_FREE,
    LORA_RUNNING,
    LORA_WAITING,
    N_FEATURES,
    SINCE_LAST_CHUNK_MS,
    STEP_EWMA_ALPHA,
    STEP_INTERVAL_MS,
    PodClassCodes,
    build_matrix,
    clock,
    feature_dict,
    observe_chunk,
    set_clock,
)

from predictor_helpers import make_endpoint, make_request


def test_matrix_has_one_row_per_candidate_with_documented_columns() -> None:
    a = make_endpoint("10.0.0.1:8000", waiting=3, running=7, kv=0.42, pod_class="h100", inflight=2)
    a.inflight_prefill_tokens = 900
    a.inflight_decode_tokens = 128
    b = make_endpoint("10.0.0.2:8000", pod_class="l40s")
    req = make_request(tokens=200, max_tokens=50)
    classes = PodClassCodes()
    x = build_matrix(req, [a, b], {"10.0.0.1:8000": 0.75}, classes)
    assert x.shape == (2, N_FEATURES) and x.dtype == np.float64
    ra = feature_dict(x[0])
    assert list(ra) == list(FEATURE_NAMES)
    assert ra["kv_usage"] == 0.42 and ra["waiting"] == 3 and ra["running"] == 7
    assert ra["inflight_prefill_tokens"] == 900 and ra["inflight_decode_tokens"] == 128 and ra["inflight"] == 2
    assert ra["input_tokens"] == 200 and ra["prefix_score"] == 0.75 and ra["uncached_input_tokens"] == 50
    assert ra["max_tokens"] == 50 and ra["lora_state"] == LORA_NONE
    rb = feature_dict(x[1])
    assert rb["prefix_score"] == 0.0 and rb["uncached_input_tokens"] == 200
    assert ra["pod_class"] != rb["pod_class"]
    assert classes.as_dict() == {"h100": int(ra["pod_class"]), "l40s": int(rb["pod_class"])}


def test_unknown_max_tokens_is_nan_and_bad_prefix_scores_are_clamped() -> None:
    a = make_endpoint("10.0.0.1:8000")
    b = make_endpoint("10.0.0.2:8000")
    x = build_matrix(make_request(max_tokens=None), [a, b], {"10.0.0.1:8000": 1.7, "10.0.0.2:8000": float("nan")}, PodClassCodes())
    assert math.isnan(x[0, 11])
    assert x[0, 7] == 1.0 and x[1, 7] == 0.0


def test_pod_class_codes_are_stable_and_merge_never_renumbers() -> None:
    c = PodClassCodes({"a": 0, "b": 1})
    assert c.code("a") == 0 and c.code("c") == 2
    c.merge({"a": 5, "d": 3, "e": 2})  # 'a' is known; code 2 is taken by 'c'
    assert c.as_dict() == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_lora_states() -> None:
    ep = make_endpoint("10.0.0.1:8000")
    ep.metrics = PodMetrics(running_loras=frozenset({"ad1"}), waiting_loras=frozenset({"ad2"}), max_loras=2, updated_at=1.0)
    classes = PodClassCodes()

    def state(model: str) -> float:
        return float(build_matrix(make_request(model=model), [ep], None, classes)[0, 10])

    assert state("ad1") == LORA_RUNNING
    assert state("ad2") == LORA_WAITING
    assert state("ad3") == LORA_COLD
    assert state("m") == LORA_NONE  # the base model the pod serves


def test_empty_candidates() -> None:
    assert build_matrix(make_request(), [], None, PodClassCodes()).shape == (0, N_FEATURES)


def test_lora_slots_free_counts_slots_not_taken_by_running_adapters() -> None:
    ep = make_endpoint("10.0.0.1:8000")
    ep.metrics = PodMetrics(running_loras=frozenset({"ad1", "ad2"}), max_loras=4, updated_at=1.0)
    plain = make_endpoint("10.0.0.2:8000")  # reports no LoRA slots
    x = build_matrix(make_request(model="ad3"), [ep, plain], None, PodClassCodes())
    assert FEATURE_NAMES[LORA_SLOTS_FREE] == "lora_slots_free"
    assert x[0, LORA_SLOTS_FREE] == 2.0
    assert math.isnan(x[1, LORA_SLOTS_FREE])


def test_step_phase_columns_from_endpoint_chunk_state() -> None:
    busy = make_endpoint("10.0.0.1:8000")
    busy.last_chunk_ts = 100.0
    busy.chunk_interval_s = 0.025
    silent = make_endpoint("10.0.0.2:8000")  # never streamed
    stale = make_endpoint("10.0.0.3:8000")
    stale.last_chunk_ts = 50.0
    x = build_matrix(make_request(), [busy, silent, stale], None, PodClassCodes(), now=100.012)
    assert FEATURE_NAMES[SINCE_LAST_CHUNK_MS] == "since_last_chunk_ms"
    assert FEATURE_NAMES[STEP_INTERVAL_MS] == "step_interval_ms"
    assert x[0, SINCE_LAST_CHUNK_MS] == pytest.approx(12.0)
    assert x[0, STEP_INTERVAL_MS] == pytest.approx(25.0)
    assert x[1, SINCE_LAST_CHUNK_MS] == CHUNK_AGE_CAP_MS and math.isnan(x[1, STEP_INTERVAL_MS])
    assert x[2, SINCE_LAST_CHUNK_MS] == CHUNK_AGE_CAP_MS  # silent for 50 s: clipped
    # a chunk stamped after the decision clock read (another thread, clock skew) is age 0, never negative
    assert build_matrix(make_request(), [busy], None, PodClassCodes(), now=99.0)[0, SINCE_LAST_CHUNK_MS] == 0.0


def test_default_now_comes_from_the_installed_clock() -> None:
    ep = make_endpoint("10.0.0.1:8000")
    ep.last_chunk_ts = 7.0
    prev = set_clock(lambda: 7.004)
    try:
        assert clock() == 7.004
        assert build_matrix(make_request(), [ep], None, PodClassCodes())[0, SINCE_LAST_CHUNK_MS] == pytest.approx(4.0)
    finally:
        assert set_clock(prev)() == 7.004
    assert clock() > 0.0


def test_observe_chunk_keeps_a_step_interval_ewma_ignoring_same_step_and_idle_gaps() -> None:
    ep = make_endpoint("10.0.0.1:8000")
    observe_chunk(ep, 10.0)
    assert ep.last_chunk_ts == 10.0 and ep.chunk_interval_s == 0.0
    observe_chunk(ep, 10.0005)  # another stream's chunk of the same step
    assert ep.chunk_interval_s == 0.0 and ep.last_chunk_ts == 10.0005
    observe_chunk(ep, 10.0305)  # next step, 30 ms later: first measurement is taken as is
    assert ep.chunk_interval_s == pytest.approx(0.030)
    observe_chunk(ep, 10.0405)  # a 10 ms step moves the EWMA by alpha of the difference
    assert ep.chunk_interval_s == pytest.approx(0.030 + STEP_EWMA_ALPHA * (0.010 - 0.030))
    before = ep.chunk_interval_s
    observe_chunk(ep, 12.0)  # after an idle period: not a step
    assert ep.chunk_interval_s == before and ep.last_chunk_ts == 12.0


def test_server_tracker_feeds_the_step_phase_state() -> None:
    from extproc.scheduling.framework import Observation
    from extproc.server.tracker import Flight

    ep = make_endpoint("10.0.0.1:8000")
    req = make_request()
    f = Flight(req, ep, Observation("r1", ep.address, "m", 100, dispatch_ts=1.0), 64)
    f.on_body_chunk(b"data: {}\n\n", 5.0)
    f.on_body_chunk(b"", 5.01)  # empty frames are not chunks
    f.on_body_chunk(b"data: {}\n\n", 5.02)
    assert ep.last_chunk_ts == 5.02 and ep.chunk_interval_s == pytest.approx(0.02)
