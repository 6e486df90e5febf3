"""P/D: the predictor learns both legs — the prefill leg on prefill pods (pd_leg 1, target: the prefill-leg time)
and TTFT after the prefill leg on decode pods (pd_leg 2, with the KV transfer as a feature) — and the P/D
profiles rank pods by those predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from predictor_helpers import make_endpoint, make_request

from extproc.api import parse_request
from extproc.cycle import PD_STAGE, PD_STAGE_DECODE, PD_STAGE_PREFILL, PREDICTOR_PREFILL_FEATURES, Observation
from extproc.predictor.features import (
    FEATURE_NAMES,
    INFLIGHT_PREFILL_TOKENS,
    KV_TRANSFER_MS,
    KV_TRANSFER_TOKENS,
    LEGACY_N_FEATURES,
    N_FEATURES,
    PD_AGGREGATED,
    PD_DECODE,
    PD_LEG,
    PD_PREFILL,
    PREFIX_SCORE,
    UNCACHED_INPUT_TOKENS,
    PodClassCodes,
    TransferModel,
    build_matrix,
)
from extproc.predictor.model import LatencyModel
from extproc.predictor.persistence import BUNDLED_MODEL, load_model
from extproc.predictor.service import FeatureRow, PredictorService, ServiceConfig, transfer_from_params
from extproc.predictor.trainer import SampleWindow, TrainerConfig, fit_models
from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.latency import PredictedLatencyScorer
from extproc.server.tracker import FlightTracker

LLAMA8B = TransferModel(bytes_per_token=131072.0, gbps=400.0, efficiency=0.8, setup_ms=0.5)


def test_transfer_columns_only_on_decode_leg() -> None:
    a, b = make_endpoint("10.0.0.1:8000"), make_endpoint("10.0.0.2:8000")
    req = make_request(tokens=5000)
    prefix = {"10.0.0.1:8000": 0.0, "10.0.0.2:8000": 0.5}
    x = build_matrix(req, [a, b], prefix, PodClassCodes(), pd_leg=PD_DECODE, transfer=LLAMA8B)
    assert x.shape == (2, N_FEATURES) and FEATURE_NAMES[PD_LEG] == "pd_leg"
    assert list(x[:, PD_LEG]) == [PD_DECODE, PD_DECODE]
    assert list(x[:, KV_TRANSFER_TOKENS]) == [5000.0, 2500.0]  # what the decode pod does not hold already
    # 5,000 tokens x 128 KiB = 655 MB over 320 Gb/s effective: 16.4 ms + 0.5 ms setup
    assert x[0, KV_TRANSFER_MS] == pytest.approx(0.5 + 5000 * 131072 * 8 / 320e9 * 1000)
    assert x[1, KV_TRANSFER_MS] == pytest.approx(0.5 + 2500 * 131072 * 8 / 320e9 * 1000)
    for leg in (PD_PREFILL, PD_AGGREGATED):
        y = build_matrix(req, [a, b], prefix, PodClassCodes(), pd_leg=leg, transfer=LLAMA8B)
        assert list(y[:, PD_LEG]) == [leg, leg]
        assert list(y[:, KV_TRANSFER_TOKENS]) == [0.0, 0.0] and list(y[:, KV_TRANSFER_MS]) == [0.0, 0.0]
    # no transfer model: the estimate is unknown, the token count is still there
    z = build_matrix(req, [a], None, PodClassCodes(), pd_leg=PD_DECODE)
    assert math.isnan(z[0, KV_TRANSFER_MS]) and z[0, KV_TRANSFER_TOKENS] == 5000.0


def test_transfer_params() -> None:
    t = transfer_from_params({"modelDims": {"layers": 32, "kvHeads": 8, "headDim": 128, "dtypeBytes": 2}, "linkGbps": 400})
    assert t == LLAMA8B
    tp = transfer_from_params({"modelDims": {"layers": 32, "kvHeads": 8, "headDim": 128, "tensorParallel": 4}, "linkGbps": 400})
    assert tp is not None and tp.bytes_per_token == 32768.0
    assert transfer_from_params({}) is None
    with pytest.raises(ValueError):
        transfer_from_params({"linkGbps": 400})  # no KV size
    with pytest.raises(ValueError):
        transfer_from_params({"kvBytesPerToken": 1, "modelDims": {"layers": 1, "kvHeads": 1, "headDim": 1}, "linkGbps": 1})


def test_legacy_model_and_window_still_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = load_model(BUNDLED_MODEL)  # trained before the P/D columns
    assert m.n_features == LEGACY_N_FEATURES < N_FEATURES
    x = build_matrix(make_request(), [make_endpoint("10.0.0.1:8000")], None, PodClassCodes(), pd_leg=PD_DECODE)
    p = m.predict(x)
    assert p.ttft_ms.shape == (1,) and p.ttft_ms[0] > 0
    # a saved 16-column window is read as aggregated rows
    path = str(tmp_path / "w.npz")
    np.savez(path, x=np.ones((3, LEGACY_N_FEATURES)), ttft=np.full(3, 10.0), tpot=np.full(3, 1.0))
    w = SampleWindow(10)
    assert w.load(path) == 3
    xs, _, _ = w.arrays()
    assert xs.shape == (3, N_FEATURES) and (xs[:, PD_LEG] == PD_AGGREGATED).all()
    with pytest.raises(ValueError):
        LatencyModel.from_strings(m.model_strings, version=1, quantile_alpha=0.9, n_samples=1, pod_classes={},
                                  feature_names=FEATURE_NAMES[:LEGACY_N_FEATURES - 1])


class _Capture:
    """A trainer stand-in that keeps what the service hands it (the service's own batching and targets)."""

    alive = True
    restored_samples = 0

    def __init__(self) -> None:
        self.x: list[np.ndarray] = []
        self.t: list[float] = []
        self.p: list[float] = []

    def submit(self, x: np.ndarray, t: np.ndarray, p: np.ndarray) -> None:
        self.x.extend(x)
        self.t.extend(t.tolist())
        self.p.extend(p.tolist())

    def stop(self) -> None:
        pass


def _obs(prefill: bool, features: FeatureRow, prefill_features: FeatureRow | None) -> Observation:
    o = Observation("r", "10.0.0.9:8000", "m", 5000, dispatch_ts=10.0, first_token_ts=10.5, complete_ts=12.5,
                    output_tokens=101, status=200, features=features)
    if prefill:
        o.prefill_endpoint = "10.0.0.1:8000"
        o.prefill_ms = 380.0
        o.prefill_features = prefill_features
    return o


def _rows(leg: int) -> FeatureRow:
    x = build_matrix(make_request(tokens=5000), [make_endpoint("10.0.0.1:8000")], None, PodClassCodes(), pd_leg=leg,
                     transfer=LLAMA8B)
    return FeatureRow(x[0], None, math.nan, math.nan)


def test_split_request_gives_a_sample_per_leg() -> None:
    svc = PredictorService(ServiceConfig(mode="inline", batch_size=1))
    cap = _Capture()
    svc.trainer = cap  # type: ignore[assignment]
    assert svc.observe(_obs(True, _rows(PD_DECODE), _rows(PD_PREFILL)))
    assert len(cap.t) == 2
    by_leg = {int(x[PD_LEG]): (t, p) for x, t, p in zip(cap.x, cap.t, cap.p)}
    assert by_leg[PD_PREFILL] == (380.0, 0.0)  # the prefill leg: its time, no TPOT
    t, p = by_leg[PD_DECODE]
    assert t == pytest.approx(500.0 - 380.0)  # TTFT after the prefill leg
    assert p == pytest.approx(2000.0 / 100)
    st = svc.stats()
    assert st["prefill_leg_samples"] == 1 and st["decode_leg_samples"] == 1


def test_unsplit_decode_row_is_relabelled() -> None:
    svc = PredictorService(ServiceConfig(mode="inline", batch_size=1))
    cap = _Capture()
    svc.trainer = cap  # type: ignore[assignment]
    assert svc.observe(_obs(False, _rows(PD_DECODE), _rows(PD_PREFILL)))
    assert len(cap.t) == 1  # no prefill leg happened: the prefill row is not a sample
    x = cap.x[0]
    assert x[PD_LEG] == PD_AGGREGATED and x[KV_TRANSFER_TOKENS] == 0.0 and x[KV_TRANSFER_MS] == 0.0
    assert cap.t[0] == pytest.approx(500.0)  # the whole TTFT: the decode pod prefilled itself


def test_tracker_carries_both_rows_and_the_leg_time() -> None:
    seen: list[Observation] = []
    now = [100.0]
    tr = FlightTracker(lambda req, obs: seen.append(obs), clock=lambda: now[0])
    d, p = make_endpoint("10.0.0.2:8000"), make_endpoint("10.0.0.1:8000")
    req = parse_request("/v1/completions", json.dumps({"model": "m", "prompt": "x" * 400, "max_tokens": 5}).encode(), {})
    drow, prow = _rows(PD_DECODE), _rows(PD_PREFILL)
    f = tr.dispatch(req, d, drow, p, prow)
    now[0] = 100.25
    f.prefill_leg_done(now[0])
    assert p.inflight == 0 and p.inflight_prefill_tokens == 0 and d.inflight == 1
    tr.finish(f, "ok")
    o = seen[0]
    assert o.features is drow and o.prefill_features is prow
    assert o.prefill_ms == pytest.approx(250.0)


# ---------------------------------------------------------------- learning and ranking

def _train_pd_model(seed: int = 0) -> LatencyModel:
    """A model on a synthetic P/D law: prefill leg = 80 ms per 5k uncached tokens + the queue of prompt tokens in
    flight ahead (same rate); after the prefill leg = 10 ms + the transfer's estimated time x 4 (slow link)."""
    rng = np.random.default_rng(seed)
    n = 1500
    classes = PodClassCodes()
    rows, ys = [], []
    for i in range(n):
        ep = make_endpoint("10.0.0.1:8000")
        ep.inflight_prefill_tokens = int(rng.integers(0, 40000))
        tokens = int(rng.integers(2000, 6000))
        ps = float(rng.choice([0.0, 0.3, 0.9]))
        leg = PD_PREFILL if i % 2 == 0 else PD_DECODE
        x = build_matrix(make_request(tokens=tokens), [ep], {"10.0.0.1:8000": ps}, classes, pd_leg=leg, transfer=LLAMA8B)[0]
        if leg == PD_PREFILL:
            y = 80.0 * (x[UNCACHED_INPUT_TOKENS] + x[INFLIGHT_PREFILL_TOKENS]) / 5000.0 + 5.0
        else:
            y = 10.0 + 4.0 * x[KV_TRANSFER_MS]
        rows.append(x)
        ys.append(y)
    xs = np.stack(rows)
    cfg = TrainerConfig(min_samples=50, n_trees=80, quantile_trees=20, tpot_trees=10, tpot_quantile_trees=5,
                        point_objective="regression", min_data_in_leaf=3)
    res = fit_models(xs, np.array(ys), np.full(n, 5.0), cfg)
    return LatencyModel.from_strings(res.strings, version=1, quantile_alpha=0.9, n_samples=n, pod_classes=classes.as_dict())


@pytest.fixture(scope="module")
def pd_model() -> LatencyModel:
    return _train_pd_model()


def test_prefill_profile_picks_least_predicted_prefill_leg(pd_model: LatencyModel) -> None:
    svc = PredictorService(ServiceConfig(mode="thread", transfer=LLAMA8B))
    svc.install(pd_model, "test")
    scorer = PredictedLatencyScorer("pl", svc)
    pods = [make_endpoint(f"10.0.0.{i}:8000") for i in (1, 2, 3)]
    for ep, q in zip(pods, (30000, 2000, 15000)):
        ep.inflight_prefill_tokens = q
    cycle = CycleState()
    cycle.set(PD_STAGE, PD_STAGE_PREFILL)
    scores = list(scorer.score(cycle, make_request(tokens=5000), pods))
    assert scores.index(max(scores)) == 1 and scores.index(min(scores)) == 0
    # the prefill stage's rows and predictions live apart from the decode stage's
    assert set(cycle.data[PREDICTOR_PREFILL_FEATURES]) == {p.address for p in pods}
    pm = cycle.data["predicted_prefill_ms"]
    assert pm["10.0.0.2:8000"] < pm["10.0.0.3:8000"] < pm["10.0.0.1:8000"]
    assert "predicted_ttft_ms" not in cycle.data and "predictor_features" not in cycle.data
    # ~ (5000 + 2000) x 80 / 5000 + 5 = 117 ms on the idle-most pod
    assert 80.0 < pm["10.0.0.2:8000"] < 170.0


def test_decode_profile_picks_least_predicted_transfer(pd_model: LatencyModel) -> None:
    svc = PredictorService(ServiceConfig(mode="thread", transfer=LLAMA8B))
    svc.install(pd_model, "test")
    scorer = PredictedLatencyScorer("pl", svc, ttft_weight=1.0, tpot_weight=0.0)
    pods = [make_endpoint(f"10.0.0.{i}:8000") for i in (1, 2)]
    cycle = CycleState()
    cycle.set(PD_STAGE, PD_STAGE_DECODE)
    cycle.data["prefix_scores"] = {"10.0.0.1:8000": 0.0, "10.0.0.2:8000": 0.9}  # pod 2 holds 90 % of the prompt
    scores = list(scorer.score(cycle, make_request(tokens=5000), pods))
    assert scores[1] > scores[0]
    rows = cycle.data["predictor_features"]
    assert rows["10.0.0.2:8000"].values[PREFIX_SCORE] == 0.9
    assert rows["10.0.0.1:8000"].ttft_ms > rows["10.0.0.2:8000"].ttft_ms


def test_prefill_cold_start_is_least_outstanding_work() -> None:
    svc = PredictorService(ServiceConfig(mode="thread"))
    scorer = PredictedLatencyScorer("pl", svc)
    pods = [make_endpoint(f"10.0.0.{i}:8000") for i in (1, 2, 3)]
    for ep, q in zip(pods, (9000, 0, 4000)):
        ep.inflight_prefill_tokens = q
    cycle = CycleState()
    cycle.set(PD_STAGE, PD_STAGE_PREFILL)
    # pod 2 has nothing in flight but pod 3 holds the prompt: 4000 + 0 < 0 + 5000 uncached
    cycle.data["prefix_scores"] = {"10.0.0.3:8000": 1.0}
    s = list(scorer.score(cycle, make_request(tokens=5000), pods))
    assert s[2] == 1.0 and s[0] == 0.0 and 0.0 < s[1] < 1.0
    neutral = PredictedLatencyScorer("pl2", svc, cold_start="neutral")
    assert list(neutral.score(CycleState(), make_request(), pods)) == [0.0, 0.0, 0.0]
