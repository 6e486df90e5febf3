"""Online training of the TTFT/TPOT regressors, away from the event loop.

Observations (feature row at decision time + measured TTFT/TPOT) arrive in batches. The trainer keeps a bounded,
bucketed sliding window — buckets are waiting-queue bins × KV-use 5 % bins × prefix-score quartiles, each a FIFO of
at most ``bucket_cap`` samples — so a burst of one regime cannot push the rare regimes out. Every
``retrain_every`` new samples or ``retrain_interval_s`` seconds (whichever first, once ``min_samples`` are held)
it refits four LightGBM regressors from scratch on log-latency: quantile (alpha) and point, for TTFT and TPOT.
The point model (``ttft_mean``/``tpot_mean``, the name is kept for file compatibility) is an L1 fit on log-latency,
i.e. the conditional median: with the step-phase noise the scheduler cannot see, the median has a lower mean
absolute percentage error than the L2 (geometric-mean) fit. The hot path evaluates only the quantile boosters.
Full refits on a bounded window instead of ``Booster.refit`` because refit with a quantile objective misbehaves
on large targets (LightGBM issue #5760), and log targets keep the quantile loss well scaled.

Two runners share ``TrainerCore``:
- ``ProcessTrainer``: a separate process (multiprocessing *spawn* context) fed through a ``multiprocessing.Queue``
  (``put`` never blocks: a feeder thread pickles and writes), answering with model strings on a second queue that a
  daemon reader thread drains, so neither sending nor receiving ever runs on the event loop.
- ``ThreadTrainer``: the same loop on a daemon thread (tests, the CLI, single-process tools).
- ``InlineTrainer``: the same window and retrain policy run synchronously inside ``submit`` on a caller-supplied
  clock. The virtual-time benchmark uses it: retrains happen on exactly the same schedule of samples (and of
  virtual seconds) every run, so a cold-start run is deterministic for a seed.
All call ``on_model(TrainResult)`` from their reader/worker thread (inline: from ``submit``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from extproc.predictor.features import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    KV_USAGE,
    LEGACY_N_FEATURES,
    N_FEATURES,
    PD_LEG,
    PREFIX_SCORE,
    WAITING,
)

log = logging.getLogger(__name__)

WINDOW_FILE = "predictor-window.npz"
# Waiting-queue bin edges: [0], [1], [2], [3,4], [5,8], [9,16], [17,32], [33,∞).
_WAITING_EDGES = np.array([1, 2, 3, 5, 9, 17, 33], dtype=np.float64)


@dataclass(slots=True, frozen=True)
class TrainerConfig:
    quantile_alpha: float = 0.9
    min_samples: int = 200
    retrain_every: int = 200
    retrain_interval_s: float = 5.0
    bucket_cap: int = 300
    max_train_samples: int = 20000
    n_trees: int = 60  # TTFT point-model rounds
    quantile_trees: int = 20  # extra TTFT quantile rounds boosted on top of the point model
    tpot_trees: int = 40  # TPOT point-model rounds
    tpot_quantile_trees: int = 20  # extra TPOT quantile rounds
    num_leaves: int = 15
    max_depth: int = 6
    learning_rate: float = 0.15
    quantile_learning_rate: float = 0.2
    point_objective: str = "l1"  # "l1" (log-space median, default) or "regression" (L2, log-space mean)
    min_data_in_leaf: int = 5
    seed: int = 0
    state_dir: str | None = None  # the window is saved here after each retrain and reloaded at start
    nice: int = 5  # the process runner lowers its priority so the scheduler keeps the CPU

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile_alpha < 1.0:
            raise ValueError(f"quantile_alpha must be in (0, 1), got {self.quantile_alpha}")
        for name in (
            "min_samples", "retrain_every", "bucket_cap", "n_trees", "quantile_trees", "tpot_trees",
            "tpot_quantile_trees", "num_leaves", "max_depth", "max_train_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.point_objective not in ("l1", "regression"):
            raise ValueError(f"point_objective must be 'l1' or 'regression', got {self.point_objective!r}")
        if self.learning_rate <= 0 or self.quantile_learning_rate <= 0:
            raise ValueError("learning rates must be > 0")
        if self.retrain_interval_s <= 0:
            raise ValueError("retrain_interval_s must be > 0")


@dataclass(slots=True)
class TrainResult:
    strings: dict[str, str]
    n_samples: int
    n_ttft: int
    n_tpot: int
    seconds: float
    window_size: int


def bucket_keys(x: np.ndarray) -> np.ndarray:
    """Bucket id per row: P/D leg (3) × waiting bin (8) × KV-use 5 % bin (20) × prefix quartile (4). The leg
    keeps prefill-leg rows and decode rows of a P/D fleet from pushing each other out of the window."""
    w = np.searchsorted(_WAITING_EDGES, np.nan_to_num(x[:, WAITING]), side="right")
    kv = np.clip((np.nan_to_num(x[:, KV_USAGE]) * 20.0).astype(np.int64), 0, 19)
    pq = np.clip((np.nan_to_num(x[:, PREFIX_SCORE]) * 4.0).astype(np.int64), 0, 3)
    leg = np.clip(np.nan_to_num(x[:, PD_LEG]).astype(np.int64), 0, 2)
    return ((leg * 8 + w) * 20 + kv) * 4 + pq


class SampleWindow:
    """The bucketed sliding window. Each sample is (feature row, ttft_ms, tpot_ms); tpot_ms 0 = not measured."""

    __slots__ = ("cap", "_buckets", "_size")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buckets: dict[int, deque[tuple[np.ndarray, float, float]]] = {}
        self._size = 0

    def add(self, x: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> int:
        """Add a batch; returns how many were accepted (rows with a positive TTFT and finite features)."""
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"feature batch must be (n, {N_FEATURES}), got {x.shape}")
        ok = (ttft > 0) & np.isfinite(ttft) & np.isfinite(tpot)
        if not ok.all():
            x, ttft, tpot = x[ok], ttft[ok], tpot[ok]
        keys = bucket_keys(x)
        for i in range(len(keys)):
            k = int(keys[i])
            b = self._buckets.get(k)
            if b is None:
                b = self._buckets[k] = deque(maxlen=self.cap)
            if len(b) == self.cap:
                self._size -= 1
            b.append((x[i].copy(), float(ttft[i]), float(tpot[i])))
            self._size += 1
        return len(keys)

    def __len__(self) -> int:
        return self._size

    @property
    def n_buckets(self) -> int:
        return len(self._buckets)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [s for b in self._buckets.values() for s in b]
        if not rows:
            return np.empty((0, N_FEATURES)), np.empty(0), np.empty(0)
        x = np.stack([r[0] for r in rows])
        return x, np.array([r[1] for r in rows]), np.array([r[2] for r in rows])

    def save(self, path: str) -> None:
        x, t, p = self.arrays()
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, x=x, ttft=t, tpot=p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: str) -> int:
        with np.load(path) as d:
            x, t, p = d["x"], d["ttft"], d["tpot"]
        if x.ndim == 2 and LEGACY_N_FEATURES <= x.shape[1] < N_FEATURES:
            x = pad_legacy(x)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"saved window has {x.shape[1] if x.ndim == 2 else '?'} features, expected {N_FEATURES}")
        return self.add(x, t, p)


def pad_legacy(x: np.ndarray) -> np.ndarray:
    """Rows saved before the P/D columns: aggregated requests (``pd_leg`` 0, no transfer)."""
    out = np.zeros((x.shape[0], N_FEATURES), dtype=np.float64)
    out[:, : x.shape[1]] = x
    return out


def lgb_params(cfg: TrainerConfig, objective: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "objective": objective,
        "num_leaves": cfg.num_leaves,
        "max_depth": cfg.max_depth,
        "learning_rate": cfg.quantile_learning_rate if objective == "quantile" else cfg.learning_rate,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "num_threads": 1,
        "verbose": -1,
        "seed": cfg.seed,
        "deterministic": True,
        "force_row_wise": True,
    }
    if objective == "quantile":
        p["alpha"] = cfg.quantile_alpha
    return p


def fit_models(x: np.ndarray, ttft_ms: np.ndarray, tpot_ms: np.ndarray, cfg: TrainerConfig) -> TrainResult:
    """Fit the four boosters on log-latency. Rows without a TPOT (tpot_ms ≤ 0) train only the TTFT models."""
    import lightgbm as lgb

    t0 = time.perf_counter()
    n = len(x)
    if n > cfg.max_train_samples:
        idx = np.random.default_rng(cfg.seed).choice(n, cfg.max_train_samples, replace=False)
        x, ttft_ms, tpot_ms = x[idx], ttft_ms[idx], tpot_ms[idx]
    cat = list(CATEGORICAL_FEATURES)
    names = list(FEATURE_NAMES)
    has_tpot = tpot_ms > 0
    if not has_tpot.any():
        # No stream produced two tokens yet: a flat TPOT model at 0 evidence is still a model; use TTFT rows
        # with a nominal 1 ms target so the booster exists (its predictions are reported, never trusted alone).
        xp, yp = x, np.zeros(len(x))
    else:
        xp, yp = x[has_tpot], np.log(tpot_ms[has_tpot])
    yt = np.log(ttft_ms)
    strings: dict[str, str] = {}

    def dataset(xx: np.ndarray, yy: np.ndarray) -> Any:
        return lgb.Dataset(xx, yy, feature_name=names, categorical_feature=cat, free_raw_data=False, params={"verbose": -1})

    for name, xx, yy, n_point, n_q in (
        ("ttft", x, yt, cfg.n_trees, cfg.quantile_trees),
        ("tpot", xp, yp, cfg.tpot_trees, cfg.tpot_quantile_trees),
    ):
        point = lgb.train(lgb_params(cfg, cfg.point_objective), dataset(xx, yy), num_boost_round=n_point)
        strings[f"{name}_mean"] = point.model_to_string()
        # The quantile model continues from the point model's trees: quantile gradients are ±alpha-sized, so
        # boosting it from the global quantile converges far too slowly; starting at the conditional median it
        # only has to learn the (log-space) upper margin. The result is one self-contained booster.
        q = lgb.train(lgb_params(cfg, "quantile"), dataset(xx, yy), num_boost_round=n_q, init_model=point)
        strings[f"{name}_q"] = q.model_to_string()
    return TrainResult(
        strings=strings,
        n_samples=len(x),
        n_ttft=len(x),
        n_tpot=int(has_tpot.sum()),
        seconds=time.perf_counter() - t0,
        window_size=len(x),
    )


@dataclass(slots=True)
class TrainerCore:
    """Window + retrain policy. Single-threaded: owned by the worker (process or thread)."""

    cfg: TrainerConfig
    window: SampleWindow = field(init=False)
    new_since_train: int = 0
    last_train: float = -1.0
    force: bool = False
    clock: Callable[[], float] = time.monotonic
    trained: int = 0  # fits done by this core: the first one happens as soon as min_samples are held

    def __post_init__(self) -> None:
        self.window = SampleWindow(self.cfg.bucket_cap)
        if self.last_train < 0.0:
            self.last_train = self.clock()

    def window_path(self) -> str | None:
        return os.path.join(self.cfg.state_dir, WINDOW_FILE) if self.cfg.state_dir else None

    def load_window(self) -> None:
        p = self.window_path()
        if p and os.path.exists(p):
            try:
                n = self.window.load(p)
                log.info("predictor window restored", extra={"path": p, "samples": n})
            except (OSError, ValueError, KeyError) as e:
                log.warning("predictor window not restored", extra={"path": p, "error": str(e)})

    def add(self, x: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> None:
        self.new_since_train += self.window.add(x, ttft, tpot)

    def due(self, now: float | None = None) -> bool:
        if len(self.window) < self.cfg.min_samples:
            return False
        if self.force or self.trained == 0:
            return True
        if self.new_since_train >= self.cfg.retrain_every:
            return True
        now = self.clock() if now is None else now
        return self.new_since_train > 0 and now - self.last_train >= self.cfg.retrain_interval_s

    def seconds_until_check(self) -> float:
        return max(0.05, min(1.0, self.cfg.retrain_interval_s - (self.clock() - self.last_train)))

    def train(self) -> TrainResult:
        x, t, p = self.window.arrays()
        res = fit_models(x, t, p, self.cfg)
        res.window_size = len(self.window)
        self.trained += 1
        self.new_since_train = 0
        self.force = False
        self.last_train = self.clock()
        wp = self.window_path()
        if wp:
            try:
                os.makedirs(os.path.dirname(wp), exist_ok=True)
                self.window.save(wp)
            except OSError as e:
                log.warning("predictor window not saved", extra={"path": wp, "error": str(e)})
        return res


def _handle(core: TrainerCore, msg: tuple[Any, ...]) -> bool:
    """Apply one inbound message; False means stop."""
    kind = msg[0]
    if kind == "samples":
        core.add(msg[1], msg[2], msg[3])
    elif kind == "train":
        core.force = True
    elif kind == "stop":
        return False
    return True


def _run_loop(core: TrainerCore, get: Callable[[float | None], tuple[Any, ...]], put: Callable[[tuple[Any, ...]], None]) -> None:
    """The worker loop shared by both runners: drain messages, retrain when due, post results."""
    running = True
    while running:
        try:
            msg = get(core.seconds_until_check())
        except queue.Empty:
            msg = None
        if msg is not None:
            running = _handle(core, msg)
            while running:  # drain what is already queued before deciding to train
                try:
                    msg = get(None)
                except queue.Empty:
                    break
                running = _handle(core, msg)
        if running and core.due():
            try:
                res = core.train()
            except Exception as e:  # a failed fit must not kill the trainer; report it and keep the window
                log.exception("predictor training failed")
                core.new_since_train = 0
                core.force = False
                core.trained = max(core.trained, 1)  # back to the normal schedule, no tight retry loop
                core.last_train = core.clock()
                put(("error", f"{type(e).__name__}: {e}"))
                continue
            put(("model", res))
    put(("stopped",))


def _process_main(cfg: TrainerConfig, inq: Any, outq: Any) -> None:
    if cfg.nice > 0:
        try:
            os.nice(cfg.nice)
        except OSError:
            pass
    logging.basicConfig(level=logging.WARNING)
    core = TrainerCore(cfg)
    core.load_window()
    put_stats = outq.put
    put_stats(("ready", len(core.window)))

    def get(timeout: float | None) -> tuple[Any, ...]:
        if timeout is None:
            return inq.get_nowait()  # type: ignore[no-any-return]
        return inq.get(timeout=timeout)  # type: ignore[no-any-return]

    _run_loop(core, get, outq.put)


OnModel = Callable[[TrainResult], None]
OnError = Callable[[str], None]


class ProcessTrainer:
    """The trainer in a separate (spawned) process. ``submit`` is non-blocking; results arrive on a reader thread."""

    def __init__(self, cfg: TrainerConfig, on_model: OnModel, on_error: OnError | None = None) -> None:
        self.cfg = cfg
        self.on_model = on_model
        self.on_error = on_error
        self._ctx = mp.get_context("spawn")
        self._inq: Any = None
        self._outq: Any = None
        self._proc: Any = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self.restored_samples = 0

    def start(self, wait_ready: float = 60.0) -> None:
        """Spawn the process (blocking for its import time: call it from an executor in async code)."""
        if self._proc is not None:
            return
        self._inq = self._ctx.Queue()
        self._outq = self._ctx.Queue()
        self._proc = self._ctx.Process(target=_process_main, args=(self.cfg, self._inq, self._outq), name="extproc-predictor-trainer", daemon=True)
        self._proc.start()
        self._reader = threading.Thread(target=self._read, name="extproc-predictor-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(wait_ready):
            log.warning("predictor trainer process not ready yet", extra={"waited_s": wait_ready})

    def _read(self) -> None:
        while True:
            try:
                msg = self._outq.get()
            except (EOFError, OSError, ValueError):
                return
            kind = msg[0]
            if kind == "ready":
                self.restored_samples = int(msg[1])
                self._ready.set()
            elif kind == "model":
                try:
                    self.on_model(msg[1])
                except Exception:
                    log.exception("installing a trained predictor model failed")
            elif kind == "error":
                if self.on_error is not None:
                    self.on_error(msg[1])
            elif kind == "stopped":
                return

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def submit(self, x: np.ndarray, ttft_ms: np.ndarray, tpot_ms: np.ndarray) -> None:
        if self._inq is not None:
            self._inq.put(("samples", x, ttft_ms, tpot_ms))

    def request_train(self) -> None:
        if self._inq is not None:
            self._inq.put(("train",))

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            self._inq.put(("stop",))
        except (OSError, ValueError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
        try:
            self._outq.put(("stopped",))  # wake the reader if the child died before saying so
        except (OSError, ValueError):
            pass
        if self._reader is not None:
            self._reader.join(timeout)
        for q in (self._inq, self._outq):
            q.close()
            q.join_thread()
        self._proc = None
        self._reader = None


class ThreadTrainer:
    """The same worker loop on a daemon thread of this process."""

    def __init__(self, cfg: TrainerConfig, on_model: OnModel, on_error: OnError | None = None) -> None:
        self.cfg = cfg
        self.on_model = on_model
        self.on_error = on_error
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.restored_samples = 0

    def start(self, wait_ready: float = 0.0) -> None:
        if self._thread is not None:
            return
        core = TrainerCore(self.cfg)
        core.load_window()
        self.restored_samples = len(core.window)

        def get(timeout: float | None) -> tuple[Any, ...]:
            if timeout is None:
                return self._q.get_nowait()
            return self._q.get(timeout=timeout)

        def put(msg: tuple[Any, ...]) -> None:
            if msg[0] == "model":
                try:
                    self.on_model(msg[1])
                except Exception:
                    log.exception("installing a trained predictor model failed")
            elif msg[0] == "error" and self.on_error is not None:
                self.on_error(msg[1])

        self._thread = threading.Thread(target=_run_loop, args=(core, get, put), name="extproc-predictor-trainer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, x: np.ndarray, ttft_ms: np.ndarray, tpot_ms: np.ndarray) -> None:
        self._q.put(("samples", x, ttft_ms, tpot_ms))

    def request_train(self) -> None:
        self._q.put(("train",))

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._q.put(("stop",))
        self._thread.join(timeout)
        self._thread = None


class InlineTrainer:
    """The window and retrain policy run synchronously in ``submit`` (virtual time: deterministic retrains).

    ``clock`` is the time the retrain interval is measured on (the virtual-time loop passes its own clock). A
    retrain blocks the caller for the fit (~0.1–0.4 s of wall time, zero virtual time), so this runner is for
    the virtual-time benchmark and tools, never for the server's event loop."""

    def __init__(self, cfg: TrainerConfig, on_model: OnModel, on_error: OnError | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.on_model = on_model
        self.on_error = on_error
        self.clock = clock
        self.core: TrainerCore | None = None
        self.restored_samples = 0

    def start(self, wait_ready: float = 0.0) -> None:
        if self.core is not None:
            return
        self.core = TrainerCore(self.cfg, clock=self.clock)
        self.core.load_window()
        self.restored_samples = len(self.core.window)

    @property
    def alive(self) -> bool:
        return self.core is not None

    def _maybe_train(self) -> None:
        core = self.core
        if core is None or not core.due():
            return
        try:
            res = core.train()
        except Exception as e:  # same contract as the worker loop: report, keep the window
            log.exception("predictor training failed")
            core.new_since_train = 0
            core.force = False
            core.trained = max(core.trained, 1)
            core.last_train = self.clock()
            if self.on_error is not None:
                self.on_error(f"{type(e).__name__}: {e}")
            return
        try:
            self.on_model(res)
        except Exception:
            log.exception("installing a trained predictor model failed")

    def submit(self, x: np.ndarray, ttft_ms: np.ndarray, tpot_ms: np.ndarray) -> None:
        if self.core is None:
            return
        self.core.add(x, ttft_ms, tpot_ms)
        self._maybe_train()

    def request_train(self) -> None:
        if self.core is not None:
            self.core.force = True
            self._maybe_train()

    def stop(self, timeout: float = 10.0) -> None:
        self.core = None


Trainer = ProcessTrainer | ThreadTrainer | InlineTrainer
