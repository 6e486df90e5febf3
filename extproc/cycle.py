"""Per-request records shared by the layers above the data layer: typed cycle-state keys, the cycle state, and
the observation of a finished request.

They sit below both ``extproc.scheduling`` (whose plugins fill them) and ``extproc.predictor`` (which reads the
features and prefix scores a cycle left and learns from observations), so neither imports the other's layer
upwards. Plugin authors get all of them from :mod:`extproc.plugin`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from extproc.datalayer.endpoint import Endpoint

T = TypeVar("T")


class CycleKey(str, Generic[T]):
    """A typed key of :class:`CycleState`: ``PREFIX_SCORES: CycleKey[dict[str, float]] = CycleKey("prefix_scores")``.

    It is a ``str`` (so ``cycle.data[KEY]`` keeps working and costs nothing more than a string key); the type
    parameter documents and checks, through ``cycle.get(KEY)``, what the producer stores and the consumer reads.
    Declare each shared key once (the shared ones are in :mod:`extproc.plugin`) and import it where it is used.
    """

    __slots__ = ()


class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle (e.g. prefix hashes computed by
    a scorer and reused by its pre-request hook). Keys are :class:`CycleKey` constants."""

    __slots__ = ("data", "started")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.started = time.perf_counter()

    @overload
    def get(self, key: CycleKey[T]) -> T | None: ...
    @overload
    def get(self, key: CycleKey[T], default: T) -> T: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: CycleKey[T] | str, value: T) -> None:
        self.data[key] = value


# Cycle-state keys shared between plugins (producer → consumers). Plugin-private keys stay in their module.
PREFIX_SCORES: CycleKey[dict[str, float]] = CycleKey("prefix_scores")  # address → prefix score 0..1
PREFIX_MATCHED_BLOCKS: CycleKey[dict[str, int]] = CycleKey("prefix_matched_blocks")  # address → leading blocks held
PREFIX_TOTAL_BLOCKS: CycleKey[int] = CycleKey("prefix_total_blocks")  # blocks of the request's prompt
PREFIX_BLOCK_SIZE: CycleKey[int] = CycleKey("prefix_block_size")  # block size in the producer's unit (bytes or tokens)
# address → prompt tokens the pod is estimated to hold already (approx: matched bytes / 4; precise: blocks × tokens)
PREFIX_CACHED_TOKENS: CycleKey[dict[str, int]] = CycleKey("prefix_cached_tokens")
PROMPT_TOKEN_IDS: CycleKey[list[int]] = CycleKey("prompt_token_ids")
PREDICTOR_FEATURES: CycleKey[dict[str, Any]] = CycleKey("predictor_features")  # address → FeatureRow
# the endpoint picked by an earlier profile of this cycle (decode pick in decode-first P/D), for later profiles
PEER_ENDPOINT: CycleKey[Endpoint] = CycleKey("peer_endpoint")
# P/D: the stage the profile being run serves, set by ``disagg-profile-handler`` before it returns each profile:
# "decode" (the decode pod of a split request: its TTFT comes after the prefill leg), "prefill", "encode".
# Absent: an aggregated cycle (or P/D off). The predictor builds each stage's features for its own leg.
PD_STAGE: CycleKey[str] = CycleKey("pd_stage")
PD_STAGE_DECODE = "decode"
PD_STAGE_PREFILL = "prefill"
PD_STAGE_ENCODE = "encode"
# address → FeatureRow of the prefill stage's candidates (PREDICTOR_FEATURES keeps the decode stage's)
PREDICTOR_PREFILL_FEATURES: CycleKey[dict[str, Any]] = CycleKey("predictor_prefill_features")



@dataclass(slots=True)
class Observation:
    """What one routed request did, for response-side plugins and the latency predictor."""

    request_id: str
    endpoint: str
    model: str
    prompt_tokens: int
    dispatch_ts: float  # time.monotonic()
    first_token_ts: float = 0.0
    complete_ts: float = 0.0
    output_tokens: int = 0
    status: int = 0
    error: str = ""
    features: Any = None  # the predictor's feature row for the chosen pod at decision time, if any
    prefill_endpoint: str = ""  # P/D: the prefill pod of a split request ("" = prefilled on the decode pod)
    prefill_ms: float = 0.0  # P/D: prefill-leg wall time reported by the decode pod's sidecar (x-pd-prefill-ms)
    prefill_features: Any = None  # P/D: the predictor's feature row for the prefill pod at decision time, if any

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ts - self.dispatch_ts) * 1000.0 if self.first_token_ts else 0.0

    @property
    def e2e_ms(self) -> float:
        return (self.complete_ts - self.dispatch_ts) * 1000.0 if self.complete_ts else 0.0

    @property
    def tpot_ms(self) -> float:
        if self.output_tokens > 1 and self.first_token_ts and self.complete_ts:
            return (self.complete_ts - self.first_token_ts) * 1000.0 / (self.output_tokens - 1)
        return 0.0
