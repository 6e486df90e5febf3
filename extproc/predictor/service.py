"""The shared predictor service: the live model, the hot-path prediction helper, the feed to the trainer,
persistence, online accuracy and the ``extproc_predictor_*`` metrics.

One instance per server (``ctx.services["predictor"]``), shared by the predicted-latency scorer, the SLO-aware
picker and the SLO admission filter. Hot-path cost per request: one feature matrix over all candidates and two
batched single-threaded LightGBM predictions (quantile TTFT and TPOT only; the point models are evaluated off the
hot path, for accuracy tracking), done once per scheduling cycle and cached in the cycle. Everything slow — training, parsing new boosters, writing files — happens on the trainer's
process/thread or the reader thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint
from extproc.predictor.features import (
    KV_TRANSFER_MS,
    KV_TRANSFER_TOKENS,
    N_FEATURES,
    PD_AGGREGATED,
    PD_DECODE,
    PD_LEG,
    PD_PREFILL,
    STREAM,
    PodClassCodes,
    TransferModel,
    build_matrix,
)
from extproc.predictor.model import LatencyModel, Prediction
from extproc.predictor.persistence import BUILTIN, load_initial_model, save_model, state_model_path
from extproc.predictor.trainer import InlineTrainer, ProcessTrainer, ThreadTrainer, TrainerConfig, TrainResult
from extproc.cycle import (
    PD_STAGE,
    PD_STAGE_DECODE,
    PD_STAGE_ENCODE,
    PD_STAGE_PREFILL,
    PREDICTOR_FEATURES,
    PREDICTOR_PREFILL_FEATURES,
    PREFIX_SCORES,
    CycleState,
    Observation,
)
from extproc.services import ServiceKey

log = logging.getLogger(__name__)

# Cycle keys (shared with the plugins and the server).
CYCLE_CACHE = "predictor_cache"
CYCLE_FEATURES = PREDICTOR_FEATURES
CYCLE_TTFT = "predicted_ttft_ms"
CYCLE_TPOT = "predicted_tpot_ms"
CYCLE_PREFIX = PREFIX_SCORES
CYCLE_FALLBACK = "predictor_fallback"
CYCLE_PREFILL_FEATURES = PREDICTOR_PREFILL_FEATURES
CYCLE_PREFILL_MS = "predicted_prefill_ms"  # P/D prefill stage: address → predicted prefill-leg time (quantile)

SERVICE_KEY: ServiceKey[PredictorService] = ServiceKey("predictor")
STATE_DIR_KEY: ServiceKey[str] = ServiceKey("predictor_state_dir")
# services[WARM_START_KEY] overrides every config's ``warmStart``: a path, ``builtin`` or "" (start cold). Set by
# ``extproc serve --predictor-warm-start`` and by the benchmarks (cold unless ``--warm-start FILE``).
WARM_START_KEY: ServiceKey[str] = ServiceKey("predictor_warm_start")
# services[RUNTIME_KEY]: a ``PredictorRuntime`` from a virtual-time driver (inline trainer on its clock).
RUNTIME_KEY: ServiceKey[PredictorRuntime] = ServiceKey("predictor_runtime")
CURVE_EVERY = 100  # learning curve: one point per this many observed samples

# Process-wide metrics on the default registry (one server per process).
M_FALLBACK = Counter("extproc_predictor_fallback", "Scheduling decisions made without the latency model", ["reason"])
M_PREDICTIONS = Counter("extproc_predictor_predictions", "Scheduling decisions that used the latency model")
M_ERRORS = Counter("extproc_predictor_errors", "Predictor failures (feature building, prediction, training)", ["stage"])
M_VERSION = Gauge("extproc_predictor_model_version", "Version of the live latency model (0 = none)")
M_SAMPLES = Gauge("extproc_predictor_samples", "Training samples collected (restored window + observed since start)")
M_MODEL_SAMPLES = Gauge("extproc_predictor_model_samples", "Samples the live model was trained on")
M_RETRAINS = Counter("extproc_predictor_retrains", "Models trained and installed")
M_TRAIN_SECONDS = Gauge("extproc_predictor_train_seconds", "Wall time of the last retrain (four boosters)")
M_TTFT_MAPE = Gauge("extproc_predictor_ttft_mape", "Rolling mean absolute percentage error of the TTFT mean model")
M_TTFT_COV = Gauge("extproc_predictor_ttft_p90_coverage", "Rolling share of TTFTs at or under the quantile prediction")
M_TPOT_MAPE = Gauge("extproc_predictor_tpot_mape", "Rolling mean absolute percentage error of the TPOT mean model")
M_TPOT_COV = Gauge("extproc_predictor_tpot_p90_coverage", "Rolling share of TPOTs at or under the quantile prediction")


class FeatureRow:
    """The chosen pod's features at decision time plus what was predicted for it (travels in Observation.features)."""

    __slots__ = ("values", "model", "ttft_ms", "tpot_ms")

    def __init__(self, values: np.ndarray, model: LatencyModel | None, ttft_ms: float, tpot_ms: float) -> None:
        self.values = values
        self.model = model
        self.ttft_ms = ttft_ms
        self.tpot_ms = tpot_ms

    def __repr__(self) -> str:
        v = self.model.version if self.model is not None else 0
        return f"FeatureRow(model_v={v}, ttft_ms={self.ttft_ms:.1f}, tpot_ms={self.tpot_ms:.2f})"


@dataclass(slots=True)
class PredictionSet:
    """One cycle's predictions over its candidates (``prediction`` None = fallback)."""

    key: tuple[Any, ...]
    addresses: tuple[str, ...]
    matrix: np.ndarray
    model: LatencyModel | None
    prediction: Prediction | None

    @property
    def ok(self) -> bool:
        return self.prediction is not None


class RollingAccuracy:
    """MAPE and quantile coverage over the last ``size`` completions, O(1) per update."""

    __slots__ = ("_ape", "_cov", "_ape_sum", "_cov_sum")

    def __init__(self, size: int) -> None:
        self._ape: deque[float] = deque(maxlen=size)
        self._cov: deque[float] = deque(maxlen=size)
        self._ape_sum = 0.0
        self._cov_sum = 0.0

    def add(self, actual: float, mean_pred: float, q_pred: float) -> None:
        if len(self._ape) == self._ape.maxlen:
            self._ape_sum -= self._ape[0]
            self._cov_sum -= self._cov[0]
        ape = abs(mean_pred - actual) / actual
        cov = 1.0 if actual <= q_pred else 0.0
        self._ape.append(ape)
        self._cov.append(cov)
        self._ape_sum += ape
        self._cov_sum += cov

    @property
    def count(self) -> int:
        return len(self._ape)

    @property
    def mape(self) -> float:
        return self._ape_sum / len(self._ape) if self._ape else math.nan

    @property
    def coverage(self) -> float:
        return self._cov_sum / len(self._cov) if self._cov else math.nan


@dataclass(slots=True, frozen=True)
class PredictorRuntime:
    """How a virtual-time driver runs the predictor: the trainer inline (synchronous, deterministic) and the
    retrain interval and save times on its clock."""

    clock: Any  # Callable[[], float]
    mode: str = "inline"


@dataclass(slots=True)
class ServiceConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mode: str = "process"  # "process" | "thread" | "inline"
    state_dir: str | None = None
    warm_start: str | None = None
    save_interval_s: float = 30.0
    batch_size: int = 64
    flush_interval_s: float = 0.5
    accuracy_window: int = 500
    max_pending: int = 100_000
    transfer: TransferModel | None = None  # P/D: the KV-transfer estimate of feature kv_transfer_ms

    @classmethod
    def from_params(cls, params: Mapping[str, Any], state_dir: str | None = None) -> "ServiceConfig":
        """Plugin parameters (camelCase, as in the YAML) → config. Unknown keys are the caller's business."""
        d = TrainerConfig()
        t = TrainerConfig(
            quantile_alpha=float(params.get("quantile", d.quantile_alpha)),
            min_samples=int(params.get("minSamples", d.min_samples)),
            retrain_every=int(params.get("retrainEvery", d.retrain_every)),
            retrain_interval_s=float(params.get("retrainIntervalSeconds", d.retrain_interval_s)),
            bucket_cap=int(params.get("bucketCap", d.bucket_cap)),
            max_train_samples=int(params.get("maxTrainSamples", d.max_train_samples)),
            n_trees=int(params.get("trees", d.n_trees)),
            quantile_trees=int(params.get("quantileTrees", d.quantile_trees)),
            tpot_trees=int(params.get("tpotTrees", d.tpot_trees)),
            tpot_quantile_trees=int(params.get("tpotQuantileTrees", d.tpot_quantile_trees)),
            num_leaves=int(params.get("numLeaves", d.num_leaves)),
            max_depth=int(params.get("maxDepth", d.max_depth)),
            learning_rate=float(params.get("learningRate", d.learning_rate)),
            quantile_learning_rate=float(params.get("quantileLearningRate", d.quantile_learning_rate)),
            point_objective=str(params.get("pointObjective", d.point_objective)),
            state_dir=params.get("stateDir", state_dir),
        )
        mode = str(params.get("trainer", "process"))
        if mode not in ("process", "thread", "inline"):
            raise ValueError(f"trainer must be 'process', 'thread' or 'inline', got {mode!r}")
        warm = params.get("warmStart", BUILTIN)
        transfer = transfer_from_params(params)
        return cls(
            trainer=t,
            mode=mode,
            state_dir=t.state_dir,
            warm_start=str(warm) if warm else None,
            save_interval_s=float(params.get("saveIntervalSeconds", 30.0)),
            batch_size=int(params.get("batchSize", 64)),
            accuracy_window=int(params.get("accuracyWindow", 500)),
            transfer=transfer,
        )


def transfer_from_params(params: Mapping[str, Any]) -> TransferModel | None:
    """``kvBytesPerToken`` (or ``modelDims: {layers, kvHeads, headDim, dtypeBytes}``, optionally ``tensorParallel``)
    with ``linkGbps`` (and ``linkEfficiency`` 0.8, ``linkSetupMs`` 0.5) → the KV-transfer estimate; None when
    neither is given (the feature is then ``nan`` and the model learns the transfer from the token count)."""
    bpt = params.get("kvBytesPerToken")
    dims = params.get("modelDims")
    gbps = params.get("linkGbps")
    if bpt is None and dims is None and gbps is None:
        return None
    if bpt is not None and dims is not None:
        raise ValueError("give 'kvBytesPerToken' or 'modelDims', not both")
    if dims is not None:
        if not isinstance(dims, Mapping):
            raise TypeError(f"parameter 'modelDims' must be a mapping, got {dims!r}")
        unknown = set(dims) - {"layers", "kvHeads", "headDim", "dtypeBytes", "tensorParallel"}
        if unknown:
            raise ValueError(f"modelDims: unknown keys {', '.join(sorted(unknown))}")
        try:
            bpt = 2 * int(dims["layers"]) * int(dims["kvHeads"]) * int(dims["headDim"]) * int(dims.get("dtypeBytes", 2))
        except KeyError as e:
            raise ValueError(f"modelDims needs layers, kvHeads and headDim (missing {e.args[0]})") from None
        bpt = bpt / max(int(dims.get("tensorParallel", 1)), 1)
    if bpt is None or gbps is None:
        raise ValueError("the KV-transfer estimate needs 'kvBytesPerToken' (or 'modelDims') and 'linkGbps'")
    return TransferModel(float(bpt), float(gbps), float(params.get("linkEfficiency", 0.8)), float(params.get("linkSetupMs", 0.5)))


SERVICE_PARAM_KEYS = frozenset(
    {
        "quantile",
        "minSamples",
        "retrainEvery",
        "retrainIntervalSeconds",
        "bucketCap",
        "maxTrainSamples",
        "trees",
        "quantileTrees",
        "tpotTrees",
        "tpotQuantileTrees",
        "quantileLearningRate",
        "pointObjective",
        "numLeaves",
        "maxDepth",
        "learningRate",
        "stateDir",
        "trainer",
        "warmStart",
        "saveIntervalSeconds",
        "batchSize",
        "accuracyWindow",
        "kvBytesPerToken",
        "modelDims",
        "linkGbps",
        "linkEfficiency",
        "linkSetupMs",
    }
)


class PredictorService:
    """See the module docstring. Thread model: ``predict``/``observe`` on the event loop thread; ``_on_model``
    on the trainer's reader thread (it only parses boosters, assigns ``self.model`` and writes files)."""

    def __init__(self, cfg: ServiceConfig | None = None, clock: Any = time.monotonic) -> None:
        self.owner: str | None = None  # the plugin whose parameters configured this service
        self.owner_params: dict[str, Any] = {}
        self.clock = clock
        self._configure(cfg or ServiceConfig())

    def _configure(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.classes = PodClassCodes()
        self.model: LatencyModel | None = None
        self.model_source = "none"
        self.trainer: ProcessTrainer | ThreadTrainer | InlineTrainer | None = None
        self._pending_x: list[np.ndarray] = []
        self._pending_t: list[float] = []
        self._pending_p: list[float] = []
        self._samples = 0
        self._dropped = 0
        self._fallbacks = 0
        self._predictions = 0
        self._retrains = 0
        self._last_train_s = 0.0
        self._last_error = ""
        self._last_save = 0.0
        self._save_lock = threading.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self.ttft_acc = RollingAccuracy(self.cfg.accuracy_window)
        self.tpot_acc = RollingAccuracy(self.cfg.accuracy_window)
        self.e2e_acc = RollingAccuracy(self.cfg.accuracy_window)  # non-streaming requests (TTFT head = E2E)
        # P/D: the prefill leg on prefill pods, TTFT after the prefill leg on decode pods, and their sum vs TTFT
        self.prefill_acc = RollingAccuracy(self.cfg.accuracy_window)
        self.after_prefill_acc = RollingAccuracy(self.cfg.accuracy_window)
        self.pd_ttft_acc = RollingAccuracy(self.cfg.accuracy_window)
        self._prefill_samples = 0
        self._decode_leg_samples = 0
        self._nonstream_samples = 0
        # learning curve: per CURVE_EVERY observed samples, [samples seen, TTFT APE sum, n, TPOT APE sum, n]
        self.curve: list[list[float]] = []
        self._bucket = [0.0, 0, 0.0, 0]
        self.warm_start_loaded: str | None = None
        model, source = load_initial_model(self.cfg.state_dir, self.cfg.warm_start)
        if model is not None:
            self._install(model, source)
            if source == "warm-start":
                self.warm_start_loaded = self.cfg.warm_start

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def get_or_create(cls, services: dict[str, Any], params: Mapping[str, Any], owner: str = "?") -> "PredictorService":
        """The one shared service. Its parameters are given once: by the first plugin that sets any of
        ``SERVICE_PARAM_KEYS`` (a plugin that sets none, e.g. ``slo-admission`` listed first, does not fix
        them). A later plugin that sets different ones is an error naming both plugins."""
        own = {k: params[k] for k in params if k in SERVICE_PARAM_KEYS}
        svc = services.get(SERVICE_KEY)
        if isinstance(svc, PredictorService):
            if own:
                if svc.owner is None:
                    if svc.trainer is not None:
                        raise ValueError("the predictor service is already running; its parameters cannot change")
                    svc._configure(cls._config(services, own))
                    svc.owner, svc.owner_params = owner, own
                elif own != svc.owner_params:
                    diff = sorted(k for k in set(own) | set(svc.owner_params) if own.get(k) != svc.owner_params.get(k))
                    raise ValueError(
                        f"predictor service parameters are already set by plugin '{svc.owner}'; plugin '{owner}' "
                        f"sets different ones ({', '.join(diff)}): set them on one plugin only"
                    )
            return svc
        runtime = services.get(RUNTIME_KEY)
        svc = cls(cls._config(services, own), clock=runtime.clock if isinstance(runtime, PredictorRuntime) else time.monotonic)
        if own:
            svc.owner, svc.owner_params = owner, own
        services[SERVICE_KEY] = svc
        return svc

    @staticmethod
    def _config(services: Mapping[str, Any], params: Mapping[str, Any]) -> ServiceConfig:
        cfg = ServiceConfig.from_params(params, services.get(STATE_DIR_KEY))
        if WARM_START_KEY in services:
            cfg.warm_start = str(services[WARM_START_KEY]) or None
        runtime = services.get(RUNTIME_KEY)
        if isinstance(runtime, PredictorRuntime):
            cfg.mode = runtime.mode
            cfg.batch_size = 1  # no flush timer in virtual time: every observation goes to the trainer at once
        return cfg

    # ------------------------------------------------------------------ lifecycle

    def start_sync(self) -> None:
        if self.trainer is not None:
            return
        if self.cfg.mode == "inline":
            self.trainer = InlineTrainer(self.cfg.trainer, self._on_trained, self._on_train_error, clock=self.clock)
        else:
            runner = ProcessTrainer if self.cfg.mode == "process" else ThreadTrainer
            self.trainer = runner(self.cfg.trainer, self._on_trained, self._on_train_error)
        self.trainer.start()
        self._samples += self.trainer.restored_samples
        M_SAMPLES.set(self._samples)
        log.info(
            "predictor started",
            extra={"mode": self.cfg.mode, "model_version": self.model.version if self.model else 0, "source": self.model_source},
        )

    def stop_sync(self) -> None:
        self.flush()
        if self.trainer is not None:
            self.trainer.stop()
            self.trainer = None
        self.save()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.start_sync)
        if self._flush_task is None:
            self._flush_task = loop.create_task(self._flush_loop(), name="extproc-predictor-flush")

    async def stop(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
            try:
                await self._flush_task
            except asyncio.CancelledError:
                pass
            self._flush_task = None
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.flush_interval_s)
            self.flush()

    # ------------------------------------------------------------------ hot path

    def predict(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> PredictionSet:
        """Features and (if a model is live) predictions for all candidates, once per cycle and candidate set.

        Also publishes ``predictor_features``/``predicted_ttft_ms``/``predicted_tpot_ms`` in the cycle. Never
        raises: any failure is counted and yields a fallback set (``prediction`` None).
        """
        prefix = cycle.data.get(CYCLE_PREFIX)
        addresses = tuple(ep.address for ep in candidates)
        stage = cycle.data.get(PD_STAGE)
        leg = PD_PREFILL if stage == PD_STAGE_PREFILL else PD_DECODE if stage == PD_STAGE_DECODE else PD_AGGREGATED
        key = (addresses, id(prefix) if prefix is not None else None, stage)
        cached: PredictionSet | None = cycle.data.get(CYCLE_CACHE)
        if cached is not None and cached.key == key:
            return cached
        model = self.model
        pred: Prediction | None = None
        try:
            matrix = build_matrix(request, candidates, prefix, self.classes, pd_leg=leg, transfer=self.cfg.transfer)
        except Exception as e:
            M_ERRORS.labels("features").inc()
            self._last_error = f"features: {type(e).__name__}: {e}"
            log.warning("predictor feature build failed", extra={"error": str(e)})
            matrix = np.full((len(candidates), N_FEATURES), np.nan)
            model = None
            reason = "error"
        else:
            reason = "no_model"
        if model is not None:
            try:
                pred = model.predict(matrix)
            except Exception as e:
                M_ERRORS.labels("predict").inc()
                self._last_error = f"predict: {type(e).__name__}: {e}"
                log.warning("predictor prediction failed", extra={"error": str(e)})
                pred = None
                reason = "error"
        ps = PredictionSet(key, addresses, matrix, model if pred is not None else None, pred)
        cycle.data[CYCLE_CACHE] = ps
        if stage == PD_STAGE_ENCODE:
            return ps  # encoder pods are not a leg the model learns; leave the decode stage's rows alone
        prefill_stage = leg == PD_PREFILL
        if pred is not None:
            tt = pred.ttft_ms.tolist()
            tp = pred.tpot_ms.tolist()
            rows = {a: FeatureRow(matrix[i], model, tt[i], tp[i]) for i, a in enumerate(addresses)}
            if prefill_stage:
                # the prefill leg's prediction: its own keys, so the decode stage's TTFT/TPOT (read by SLO
                # plugins) and feature rows stay as they were
                cycle.data[CYCLE_PREFILL_MS] = dict(zip(addresses, tt))
                cycle.data[CYCLE_PREFILL_FEATURES] = rows
            else:
                cycle.data[CYCLE_TTFT] = dict(zip(addresses, tt))
                cycle.data[CYCLE_TPOT] = dict(zip(addresses, tp))
                cycle.data[CYCLE_FEATURES] = rows
            if not cycle.data.get("predictor_counted"):
                cycle.data["predictor_counted"] = True
                self._predictions += 1
                M_PREDICTIONS.inc()
            cycle.data.pop(CYCLE_FALLBACK, None)
        else:
            rows = {a: FeatureRow(matrix[i], None, math.nan, math.nan) for i, a in enumerate(addresses)}
            if prefill_stage:
                cycle.data.pop(CYCLE_PREFILL_MS, None)
                cycle.data[CYCLE_PREFILL_FEATURES] = rows
            else:
                cycle.data.pop(CYCLE_TTFT, None)
                cycle.data.pop(CYCLE_TPOT, None)
                cycle.data[CYCLE_FEATURES] = rows
            cycle.data[CYCLE_FALLBACK] = reason
            if not cycle.data.get("predictor_counted"):
                cycle.data["predictor_counted"] = True
                self._fallbacks += 1
                M_FALLBACK.labels(reason).inc()
        return ps

    # ------------------------------------------------------------------ response side

    def observe(self, observation: Observation) -> bool:
        """Feed one completed request to the trainer and the accuracy gauges. Returns True if it was used.

        A P/D split (``prefill_endpoint`` set and the prefill leg's time known) gives up to two samples: the
        prefill pod's row (``pd_leg`` 1) with the prefill-leg time as its TTFT target, and the decode pod's row
        (``pd_leg`` 2) with TTFT − prefill leg and the TPOT. A decode row ranked as a split that was not split
        after all (the decider said no, no prefill pod) is relabelled as an aggregated row (``pd_leg`` 0)."""
        if observation.error or not (observation.status == 0 or 200 <= observation.status < 300):
            return False
        split = bool(observation.prefill_endpoint) and observation.prefill_ms > 0.0
        used = False
        prefill_mean = math.nan
        prow = observation.prefill_features if split else None
        if isinstance(prow, FeatureRow) and not np.isnan(prow.values).all():
            ok, prefill_mean = self._observe_prefill(prow, observation.prefill_ms)
            used = used or ok
        row = observation.features
        if not isinstance(row, FeatureRow):
            return used
        values = row.values
        if np.isnan(values).all():
            return used
        stream = values[STREAM] != 0.0
        if stream:
            ttft = observation.ttft_ms
            tpot = observation.tpot_ms
        else:
            # Non-streaming: the first response byte is the whole response, so the TTFT head learns the E2E
            # (what that client waits for); inter-token gaps are not observable, so no TPOT sample.
            ttft = observation.e2e_ms
            tpot = 0.0
        if not ttft > 0:
            return used
        decode_leg = values[PD_LEG] == PD_DECODE
        relabelled = False
        total = ttft
        if decode_leg:
            if split:
                ttft = ttft - observation.prefill_ms
                if not ttft > 0:
                    return used
            else:
                values = values.copy()
                values[PD_LEG] = PD_AGGREGATED
                values[KV_TRANSFER_TOKENS] = 0.0
                values[KV_TRANSFER_MS] = 0.0
                decode_leg = False
                relabelled = True
        if not self._enqueue(values, ttft, tpot):
            return used
        if not stream:
            self._nonstream_samples += 1
        if decode_leg:
            self._decode_leg_samples += 1
        if row.model is not None and not relabelled:
            after_mean = self._track_accuracy(row, ttft, tpot, stream, self.after_prefill_acc if decode_leg else self.ttft_acc)
            if decode_leg and stream and prefill_mean == prefill_mean and after_mean == after_mean and isinstance(prow, FeatureRow):
                # the two legs' predictions together against the client's TTFT
                self.pd_ttft_acc.add(total, prefill_mean + after_mean, prow.ttft_ms + row.ttft_ms)
        self._sampled()
        return True

    def _enqueue(self, values: np.ndarray, ttft: float, tpot: float) -> bool:
        if len(self._pending_t) >= self.cfg.max_pending:
            self._dropped += 1
            return False
        self._pending_x.append(values)
        self._pending_t.append(ttft)
        self._pending_p.append(tpot)
        self._samples += 1
        M_SAMPLES.set(self._samples)
        return True

    def _sampled(self) -> None:
        if self._samples % CURVE_EVERY == 0:
            b = self._bucket
            self.curve.append([float(self._samples), b[0], float(b[1]), b[2], float(b[3])])
            self._bucket = [0.0, 0, 0.0, 0]
        if len(self._pending_t) >= self.cfg.batch_size:
            self.flush()

    def _observe_prefill(self, row: FeatureRow, prefill_ms: float) -> tuple[bool, float]:
        """The prefill pod's sample (target: the prefill-leg time, no TPOT); returns (used, mean prediction)."""
        if not self._enqueue(row.values, prefill_ms, 0.0):
            return False, math.nan
        self._prefill_samples += 1
        mean = math.nan
        if row.model is not None:
            try:
                mean = float(row.model.predict_mean(row.values.reshape(1, -1)).ttft_ms[0])
            except Exception as e:
                M_ERRORS.labels("predict").inc()
                log.warning("predictor accuracy prediction failed", extra={"error": str(e)})
            else:
                self.prefill_acc.add(prefill_ms, mean, row.ttft_ms)
        self._sampled()
        return True, mean

    def _track_accuracy(self, row: FeatureRow, ttft: float, tpot: float, stream: bool = True,
                        ttft_acc: RollingAccuracy | None = None) -> float:
        """Accuracy of the row's prediction; returns the mean model's TTFT estimate (nan on failure)."""
        assert row.model is not None
        try:
            mean = row.model.predict_mean(row.values.reshape(1, -1))
        except Exception as e:
            M_ERRORS.labels("predict").inc()
            log.warning("predictor accuracy prediction failed", extra={"error": str(e)})
            return math.nan
        pt = float(mean.ttft_ms[0])
        if not stream:
            self.e2e_acc.add(ttft, pt, row.ttft_ms)
            return pt
        acc = ttft_acc if ttft_acc is not None else self.ttft_acc
        acc.add(ttft, pt, row.ttft_ms)
        if acc is self.ttft_acc:
            self._bucket[0] += abs(pt - ttft) / ttft
            self._bucket[1] += 1
            M_TTFT_MAPE.set(self.ttft_acc.mape)
            M_TTFT_COV.set(self.ttft_acc.coverage)
        if tpot > 0:
            pp = float(mean.tpot_ms[0])
            self._bucket[2] += abs(pp - tpot) / tpot
            self._bucket[3] += 1
            self.tpot_acc.add(tpot, pp, row.tpot_ms)
            M_TPOT_MAPE.set(self.tpot_acc.mape)
            M_TPOT_COV.set(self.tpot_acc.coverage)
        return pt

    def flush(self) -> None:
        """Hand pending observations to the trainer (a non-blocking queue put)."""
        if not self._pending_t or self.trainer is None:
            return
        x = np.stack(self._pending_x)
        t = np.asarray(self._pending_t, dtype=np.float64)
        p = np.asarray(self._pending_p, dtype=np.float64)
        self._pending_x, self._pending_t, self._pending_p = [], [], []
        self.trainer.submit(x, t, p)

    def request_train(self) -> None:
        """Ask for a retrain as soon as the window holds ``min_samples`` (tests, the CLI)."""
        self.flush()
        if self.trainer is not None:
            self.trainer.request_train()

    # ------------------------------------------------------------------ model installation

    def _on_trained(self, res: TrainResult) -> None:
        cur = self.model
        version = (cur.version if cur is not None else 0) + 1
        model = LatencyModel.from_strings(
            res.strings,
            version=version,
            quantile_alpha=self.cfg.trainer.quantile_alpha,
            n_samples=res.n_samples,
            pod_classes=self.classes.as_dict(),
            metadata={"source": "online", "train_seconds": round(res.seconds, 4), "n_tpot": res.n_tpot},
        )
        self._retrains += 1
        self._last_train_s = res.seconds
        M_RETRAINS.inc()
        M_TRAIN_SECONDS.set(res.seconds)
        self._install(model, "online")
        log.info("predictor model installed", extra={"version": version, "samples": res.n_samples, "train_s": round(res.seconds, 3)})
        if self.cfg.state_dir and self.clock() - self._last_save >= self.cfg.save_interval_s:
            self.save()

    def _on_train_error(self, msg: str) -> None:
        M_ERRORS.labels("train").inc()
        self._last_error = f"train: {msg}"
        log.warning("predictor training failed", extra={"error": msg})

    def _install(self, model: LatencyModel, source: str) -> None:
        self.classes.merge(model.pod_classes)
        self.model = model  # the atomic swap: readers hold whichever object they loaded
        self.model_source = source
        M_VERSION.set(model.version)
        M_MODEL_SAMPLES.set(model.n_samples)

    def install(self, model: LatencyModel, source: str = "manual") -> None:
        """Install a model built elsewhere (e.g. loaded from a file)."""
        self._install(model, source)

    def save(self) -> str | None:
        """Write the live model to the state directory (atomic). Returns the path, or None if nothing to save."""
        model = self.model
        if not self.cfg.state_dir or model is None or (self.model_source == "state" and self._retrains == 0):
            return None
        path = state_model_path(self.cfg.state_dir)
        with self._save_lock:
            try:
                save_model(model, path)
            except OSError as e:
                M_ERRORS.labels("save").inc()
                log.warning("predictor model not saved", extra={"path": path, "error": str(e)})
                return None
            self._last_save = self.clock()
        return path

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        m = self.model
        return {
            "model_version": m.version if m else 0,
            "model_source": self.model_source,
            "model_samples": m.n_samples if m else 0,
            "samples": self._samples,
            "pending": len(self._pending_t),
            "dropped": self._dropped,
            "predictions": self._predictions,
            "fallbacks": self._fallbacks,
            "retrains": self._retrains,
            "last_train_s": self._last_train_s,
            "trainer_alive": bool(self.trainer and self.trainer.alive),
            "ttft_mape": self.ttft_acc.mape,
            "ttft_p90_coverage": self.ttft_acc.coverage,
            "tpot_mape": self.tpot_acc.mape,
            "tpot_p90_coverage": self.tpot_acc.coverage,
            "accuracy_samples": self.ttft_acc.count,
            "nonstream_samples": self._nonstream_samples,
            "nonstream_e2e_mape": self.e2e_acc.mape,
            "prefill_leg_samples": self._prefill_samples,
            "decode_leg_samples": self._decode_leg_samples,
            "prefill_leg_mape": self.prefill_acc.mape,
            "ttft_after_prefill_mape": self.after_prefill_acc.mape,
            "pd_ttft_mape": self.pd_ttft_acc.mape,
            "last_error": self._last_error,
        }

    def report(self) -> dict[str, Any]:
        """The benchmark report's ``predictor`` block: how this run's model came to be and how well it did.
        ``online_*_mape``: the point model's error on the requests it predicted, over the last
        ``accuracyWindow`` completions (streaming requests; ``nonstream_e2e_mape`` for the others)."""

        def num(v: float) -> float | None:
            return None if v != v else round(float(v), 4)

        return {
            "warm_start": self.warm_start_loaded,
            "samples_trained": self._samples,
            "nonstream_samples": self._nonstream_samples,
            "retrains": self._retrains,
            "fallback_decisions": self._fallbacks,
            "decisions": self._fallbacks + self._predictions,
            "online_ttft_mape": num(self.ttft_acc.mape),
            "online_tpot_mape": num(self.tpot_acc.mape),
            "online_ttft_p90_coverage": num(self.ttft_acc.coverage),
            "nonstream_e2e_mape": num(self.e2e_acc.mape),
            # P/D (docs/pd.md): the prefill leg on prefill pods, TTFT − prefill leg on decode pods, their sum vs
            # the client's TTFT, and the quantile coverage of the first two
            "prefill_leg_samples": self._prefill_samples,
            "decode_leg_samples": self._decode_leg_samples,
            "online_prefill_leg_mape": num(self.prefill_acc.mape),
            "online_prefill_leg_p90_coverage": num(self.prefill_acc.coverage),
            "online_ttft_after_prefill_mape": num(self.after_prefill_acc.mape),
            "online_ttft_after_prefill_p90_coverage": num(self.after_prefill_acc.coverage),
            "online_pd_ttft_mape": num(self.pd_ttft_acc.mape),
            "model_version": self.model.version if self.model is not None else 0,
            "curve": [[int(c[0]), num(c[1] / c[2]) if c[2] else None, num(c[3] / c[4]) if c[4] else None] for c in self.curve],
            "curve_raw": self.curve,
        }
