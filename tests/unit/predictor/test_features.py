from __future__ import annotations

import math

import numpy as np

from extproc.datalayer.endpoint import PodMetrics
from extproc.predictor.features import (
    FEATURE_NAMES,
    LORA_COLD,
    LORA_NONE,
    LORA_SLOTS_FREE,
    LORA_RUNNING,
    LORA_WAITING,
    N_FEATURES,
    PodClassCodes,
    build_matrix,
    feature_dict,
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
