"""The predictor's feature vector: one row per (request, candidate pod) at decision time.

The same code builds rows on the live hot path, in the virtual-time training-data generator and in the tests,
so a model trained on simulator traffic sees exactly the features the server gives it.

Columns (``FEATURE_NAMES``, in order; all float64, ``nan`` = unknown):

====  ========================  ==========================================================================
 idx   name                      meaning
====  ========================  ==========================================================================
  0    kv_usage                  pod KV-cache use 0..1 (``vllm:kv_cache_usage_perc``, last scrape)
  1    waiting                   requests in the pod's waiting queue (``vllm:num_requests_waiting``)
  2    running                   requests the pod is running (``vllm:num_requests_running``)
  3    inflight_prefill_tokens   prompt tokens we sent to the pod that have not produced a first token yet
  4    inflight_decode_tokens    max_tokens of our in-flight requests that are decoding
  5    inflight                  requests we dispatched to the pod and have not seen finish
  6    input_tokens              prompt tokens of this request (tokenizer count, else chars / 4)
  7    prefix_score              prefix-cache score 0..1 of this request on this pod (0 when no prefix scorer)
  8    uncached_input_tokens     input_tokens × (1 − prefix_score): the prefill work left to do
  9    pod_class                 categorical code of the pod's ``pod-class`` label (see ``PodClassCodes``)
 10    lora_state                categorical: 0 no adapter involved, 1 adapter running, 2 adapter waiting,
                                 3 adapter requested but not loaded on the pod
 11    max_tokens                requested output budget (``nan`` when the client sent none)
 12    lora_slots_free           adapter slots not taken by a running adapter: ``max_loras`` − running adapters
                                 (``nan`` when the pod reports no LoRA slots). A cold adapter on a pod with no
                                 free slot waits until one adapter's requests all finish.
 13    since_last_chunk_ms       ms since the last response chunk we saw from the pod (``Endpoint.last_chunk_ts``),
                                 capped at ``CHUNK_AGE_CAP_MS`` (also the value when the pod never streamed). A
                                 decoding pod emits one chunk per engine step, so this says how far into its
                                 current step the pod is: a new request waits for that step to end.
 14    step_interval_ms          EWMA of the pod's gaps between steps as seen in its chunks
                                 (``Endpoint.chunk_interval_s``, see ``observe_chunk``); ``nan`` until measured.
                                 With column 13 it estimates the time left in the step in progress.
 15    stream                    1 for a streaming request, 0 for a non-streaming one. The TTFT head's target is
                                 the time to the first response byte: the first token for a stream, the whole
                                 response (E2E) for a non-streaming request, whose first byte is its last.
 16    pd_leg                    categorical, what the row's TTFT head predicts (prefill/decode disaggregation):
                                 0 ``PD_AGGREGATED`` the whole request on this pod (TTFT as above);
                                 1 ``PD_PREFILL`` the prefill leg on a prefill pod (dispatch → the prefill pod's
                                 answer: the sidecar's ``x-pd-prefill-ms``); no TPOT;
                                 2 ``PD_DECODE`` the decode pod of a split request: TTFT − prefill leg (hops, the
                                 KV transfer, decode-side queueing, the first decode step), and TPOT.
 17    kv_transfer_tokens        prompt tokens whose KV the decode pod must fetch from the prefill pod (rows with
                                 ``pd_leg`` 2: ``uncached_input_tokens`` on this decode pod; else 0)
 18    kv_transfer_ms            that transfer's estimated time: setup + tokens × KV bytes per token / link
                                 bandwidth (``TransferModel``, from the predictor's ``kvBytesPerToken`` / model
                                 dimensions and ``linkGbps`` parameters); ``nan`` when not configured, 0 when no
                                 transfer.
====  ========================  ==========================================================================

Columns 16–18 were appended for P/D; a model saved with the first 16 columns still loads and predicts (it reads
only its own columns, ``LatencyModel.n_features``).

Columns 13–14 read a clock: ``build_matrix(now=...)``, else ``clock()`` (``time.monotonic`` unless a virtual-time
driver installed its own with ``set_clock``), which must be the clock ``Endpoint.last_chunk_ts`` is stamped with.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint

FEATURE_NAMES: tuple[str, ...] = (
    "kv_usage",
    "waiting",
    "running",
    "inflight_prefill_tokens",
    "inflight_decode_tokens",
    "inflight",
    "input_tokens",
    "prefix_score",
    "uncached_input_tokens",
    "pod_class",
    "lora_state",
    "max_tokens",
    "lora_slots_free",
    "since_last_chunk_ms",
    "step_interval_ms",
    "stream",
    "pd_leg",
    "kv_transfer_tokens",
    "kv_transfer_ms",
)
N_FEATURES = len(FEATURE_NAMES)
CATEGORICAL_FEATURES: tuple[str, ...] = ("pod_class", "lora_state", "pd_leg")
# The feature list of models trained before the P/D columns existed (still loadable: they read a prefix).
LEGACY_N_FEATURES = 16

# Column indexes used outside this module (bucketing, tests).
KV_USAGE = 0
WAITING = 1
RUNNING = 2
INFLIGHT_PREFILL_TOKENS = 3
INFLIGHT_DECODE_TOKENS = 4
INFLIGHT = 5
INPUT_TOKENS = 6
PREFIX_SCORE = 7
UNCACHED_INPUT_TOKENS = 8
POD_CLASS = 9
LORA_STATE = 10
MAX_TOKENS = 11
LORA_SLOTS_FREE = 12
SINCE_LAST_CHUNK_MS = 13
STEP_INTERVAL_MS = 14
STREAM = 15
PD_LEG = 16
KV_TRANSFER_TOKENS = 17
KV_TRANSFER_MS = 18

PD_AGGREGATED = 0
PD_PREFILL = 1
PD_DECODE = 2

# ``since_last_chunk_ms`` is clipped here; a pod silent this long is not mid-step (idle, or in a long prefill the
# other columns describe), and a never-seen pod gets the same value.
CHUNK_AGE_CAP_MS = 1000.0
# Chunk gaps that update the step-interval EWMA: shorter ones are chunks of the same step (one per stream, a
# batch's chunks arrive within a few ms), longer ones span an idle period rather than a step.
STEP_GAP_MIN_S = 0.002
STEP_GAP_MAX_S = 0.5
STEP_EWMA_ALPHA = 0.2

LORA_NONE = 0
LORA_RUNNING = 1
LORA_WAITING = 2
LORA_COLD = 3


_clock: Callable[[], float] = time.monotonic


def clock() -> float:
    """Now, on the clock ``Endpoint.last_chunk_ts`` is stamped with."""
    return _clock()


def set_clock(fn: Callable[[], float]) -> Callable[[], float]:
    """Install the decision-time clock (virtual-time drivers: a function returning virtual now); returns the
    previous one so the caller can restore it."""
    global _clock
    prev = _clock
    _clock = fn
    return prev


def observe_chunk(ep: Endpoint, now: float) -> None:
    """Record a response body chunk from ``ep`` at ``now``: stamps ``last_chunk_ts`` and folds the gap since the
    previous chunk into the step-interval EWMA when it looks like one engine step (``STEP_GAP_MIN_S`` ..
    ``STEP_GAP_MAX_S``). The server's flight tracker and the training-data simulator both call this, so the
    columns the model learns from and the ones it is served are built the same way. O(1), no allocation."""
    last = ep.last_chunk_ts
    interval = ep.chunk_interval_s
    if last > 0.0:
        gap = now - last
        if STEP_GAP_MIN_S <= gap <= STEP_GAP_MAX_S:
            interval = gap if interval <= 0.0 else interval + STEP_EWMA_ALPHA * (gap - interval)
    ep.set_chunk_timing(now, interval)


@dataclass(slots=True, frozen=True)
class TransferModel:
    """The KV-transfer estimate of column 18: ``setup_ms`` + tokens × ``bytes_per_token`` / (``gbps`` ×
    ``efficiency``). KV bytes per token = 2 × layers × KV heads × head dim × dtype bytes (Llama-3-8B bf16:
    131,072 B); for TP > 1 give the per-rank share (each rank's NIC moves its own heads)."""

    bytes_per_token: float
    gbps: float
    efficiency: float = 0.8
    setup_ms: float = 0.5

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0 or self.gbps <= 0 or not 0.0 < self.efficiency <= 1.0 or self.setup_ms < 0:
            raise ValueError("transfer model: bytes_per_token > 0, gbps > 0, 0 < efficiency <= 1, setup_ms >= 0")

    def ms(self, tokens: float) -> float:
        if tokens <= 0.0:
            return 0.0
        return self.setup_ms + tokens * self.bytes_per_token * 8.0 / (self.gbps * 1e9 * self.efficiency) * 1000.0


class PodClassCodes:
    """A stable mapping from pod-class label to a small non-negative integer (LightGBM categorical code).

    Codes only grow; the mapping is saved with every model so a warm-started model and the live server agree.
    Reads are lock-free (dict lookups); a new class takes a lock.
    """

    __slots__ = ("_codes", "_lock")

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        self._codes: dict[str, int] = dict(initial or {})
        self._lock = threading.Lock()

    def code(self, pod_class: str) -> int:
        c = self._codes.get(pod_class)
        if c is not None:
            return c
        with self._lock:
            c = self._codes.get(pod_class)
            if c is None:
                c = len(self._codes)
                while c in self._codes.values():
                    c += 1
                self._codes[pod_class] = c
            return c

    def merge(self, other: Mapping[str, int]) -> None:
        """Adopt codes from a loaded model for classes we have not coded yet (never renumber a known class)."""
        with self._lock:
            used = set(self._codes.values())
            for name, c in other.items():
                if name not in self._codes and c not in used:
                    self._codes[name] = int(c)
                    used.add(int(c))

    def as_dict(self) -> dict[str, int]:
        return dict(self._codes)


def lora_state(request_model: str, ep: Endpoint) -> int:
    """Where the request's adapter stands on the pod. Base-model requests (the name is not an adapter the pod
    reports) are ``LORA_NONE``."""
    m = ep.metrics
    if request_model in m.running_loras:
        return LORA_RUNNING
    if request_model in m.waiting_loras:
        return LORA_WAITING
    if m.max_loras > 0 and request_model not in ep.models and (m.running_loras or m.waiting_loras):
        # The pod serves adapters, this one is not active or queued there and it is not a known base model.
        return LORA_COLD
    return LORA_NONE


def build_matrix(
    request: InferenceRequest,
    candidates: Sequence[Endpoint],
    prefix_scores: Mapping[str, float] | None,
    classes: PodClassCodes,
    now: float | None = None,
    pd_leg: int = PD_AGGREGATED,
    transfer: TransferModel | None = None,
) -> np.ndarray:
    """The (len(candidates), N_FEATURES) float64 feature matrix for one request over all candidates.

    ``now``: decision time on the ``last_chunk_ts`` clock (default ``clock()``). ``pd_leg``: which leg the
    candidates would serve (``PD_*``; every candidate of one scheduling profile serves the same leg).
    ``transfer``: the KV-transfer estimate for ``PD_DECODE`` rows (None: column 18 is ``nan``)."""
    if now is None:
        now = _clock()
    cap = CHUNK_AGE_CAP_MS
    input_tokens = float(request.prompt_tokens_estimate)
    max_tokens = float(request.max_tokens) if request.max_tokens is not None else math.nan
    model = request.target_model
    stream = 1.0 if request.stream else 0.0
    ps = prefix_scores or {}
    code = classes.code
    leg = float(pd_leg)
    decode_leg = pd_leg == PD_DECODE
    rows: list[tuple[float, ...]] = []
    for ep in candidates:
        m = ep.metrics
        p = ps.get(ep.address, 0.0)
        if p != p or p < 0.0:
            p = 0.0
        elif p > 1.0:
            p = 1.0
        lc = ep.last_chunk_ts
        if lc > 0.0:
            age = (now - lc) * 1000.0
            age = cap if age > cap else (0.0 if age < 0.0 else age)
        else:
            age = cap
        si = ep.chunk_interval_s
        uncached = input_tokens * (1.0 - p)
        if decode_leg:
            xfer_tokens = uncached
            xfer_ms = transfer.ms(uncached) if transfer is not None else math.nan
        else:
            xfer_tokens = xfer_ms = 0.0
        rows.append(
            (
                m.kv_usage,
                m.waiting,
                m.running,
                ep.inflight_prefill_tokens,
                ep.inflight_decode_tokens,
                ep.inflight,
                input_tokens,
                p,
                uncached,
                code(ep.pod_class),
                lora_state(model, ep),
                max_tokens,
                float(m.max_loras - len(m.running_loras)) if m.max_loras > 0 else math.nan,
                age,
                si * 1000.0 if si > 0.0 else math.nan,
                stream,
                leg,
                xfer_tokens,
                xfer_ms,
            )
        )
    if not rows:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    return np.array(rows, dtype=np.float64)


def feature_dict(row: Sequence[float] | np.ndarray) -> dict[str, float]:
    """A row as {name: value}, for logs and debugging."""
    return {name: float(row[i]) for i, name in enumerate(FEATURE_NAMES)}
