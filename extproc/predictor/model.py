"""The immutable latency model the hot path reads.

A ``LatencyModel`` holds four LightGBM boosters trained on log-latency (ms): TTFT and TPOT, each as a quantile
model (the routing estimate, alpha 0.9 by default) and a mean (L2) model (for accuracy reporting). A new model
replaces the old one by a single attribute assignment on the service, so a decision in progress keeps the
object it started with and never sees a half-swapped state.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from extproc.predictor.features import FEATURE_NAMES, LEGACY_N_FEATURES, N_FEATURES

MODEL_KEYS: tuple[str, ...] = ("ttft_q", "ttft_mean", "tpot_q", "tpot_mean")
FORMAT_NAME = "extproc-latency-predictor"
FORMAT_VERSION = 1

# exp() of the raw log-ms prediction is clipped to this range (ms) so a wild extrapolation cannot overflow.
_MIN_MS = 0.01
_MAX_MS = 3.6e6


@dataclass(slots=True, frozen=True)
class Prediction:
    """Predicted latencies (ms) for a batch of candidates, in candidate order."""

    ttft_ms: np.ndarray  # quantile model
    tpot_ms: np.ndarray  # quantile model


def _to_ms(raw: np.ndarray) -> np.ndarray:
    return np.clip(np.exp(raw), _MIN_MS, _MAX_MS)


@dataclass(slots=True, frozen=True)
class LatencyModel:
    """Four boosters + their provenance. Build with ``from_strings``; never mutate."""

    version: int
    ttft_q: lgb.Booster
    ttft_mean: lgb.Booster
    tpot_q: lgb.Booster
    tpot_mean: lgb.Booster
    model_strings: Mapping[str, str]
    quantile_alpha: float
    n_samples: int
    trained_at: float
    pod_classes: Mapping[str, int]
    feature_names: tuple[str, ...] = FEATURE_NAMES
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_strings(
        cls,
        strings: Mapping[str, str],
        *,
        version: int,
        quantile_alpha: float,
        n_samples: int,
        pod_classes: Mapping[str, int],
        trained_at: float | None = None,
        feature_names: tuple[str, ...] = FEATURE_NAMES,
        metadata: Mapping[str, Any] | None = None,
    ) -> "LatencyModel":
        missing = [k for k in MODEL_KEYS if k not in strings]
        if missing:
            raise ValueError(f"latency model is missing boosters: {missing}")
        names = tuple(feature_names)
        # a model from before the P/D columns (a prefix of this build's list) still loads: it reads its columns
        if names != FEATURE_NAMES and not (len(names) >= LEGACY_N_FEATURES and names == FEATURE_NAMES[: len(names)]):
            raise ValueError(f"latency model features {list(feature_names)} do not match this build's {list(FEATURE_NAMES)}")
        boosters = {k: lgb.Booster(model_str=strings[k]) for k in MODEL_KEYS}
        for k, b in boosters.items():
            if b.num_feature() != len(names):
                raise ValueError(f"booster {k} expects {b.num_feature()} features, not {len(names)}")
        return cls(
            version=version,
            ttft_q=boosters["ttft_q"],
            ttft_mean=boosters["ttft_mean"],
            tpot_q=boosters["tpot_q"],
            tpot_mean=boosters["tpot_mean"],
            model_strings={k: strings[k] for k in MODEL_KEYS},
            quantile_alpha=float(quantile_alpha),
            n_samples=int(n_samples),
            trained_at=float(trained_at if trained_at is not None else time.time()),
            pod_classes=dict(pod_classes),
            feature_names=tuple(feature_names),
            metadata=dict(metadata or {}),
        )

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def _cols(self, matrix: np.ndarray) -> np.ndarray:
        n = len(self.feature_names)
        return matrix if n == N_FEATURES or matrix.shape[1] == n else np.ascontiguousarray(matrix[:, :n])

    def predict(self, matrix: np.ndarray) -> Prediction:
        """Routing estimates for all candidates: two batched single-threaded predictions."""
        matrix = self._cols(matrix)
        return Prediction(
            ttft_ms=_to_ms(self.ttft_q.predict(matrix, num_threads=1)),
            tpot_ms=_to_ms(self.tpot_q.predict(matrix, num_threads=1)),
        )

    def predict_mean(self, matrix: np.ndarray) -> Prediction:
        """Mean-model estimates (used off the hot path: accuracy tracking and evaluation)."""
        matrix = self._cols(matrix)
        return Prediction(
            ttft_ms=_to_ms(self.ttft_mean.predict(matrix, num_threads=1)),
            tpot_ms=_to_ms(self.tpot_mean.predict(matrix, num_threads=1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_version": self.version,
            "feature_names": list(self.feature_names),
            "quantile_alpha": self.quantile_alpha,
            "n_samples": self.n_samples,
            "trained_at": self.trained_at,
            "pod_classes": dict(self.pod_classes),
            "metadata": dict(self.metadata),
            "models": dict(self.model_strings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyModel":
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a latency predictor file (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) != FORMAT_VERSION:
            raise ValueError(f"unsupported latency predictor format_version {d.get('format_version')!r}")
        return cls.from_strings(
            d["models"],
            version=int(d["model_version"]),
            quantile_alpha=float(d["quantile_alpha"]),
            n_samples=int(d["n_samples"]),
            pod_classes={str(k): int(v) for k, v in dict(d.get("pod_classes") or {}).items()},
            trained_at=float(d.get("trained_at", 0.0)),
            feature_names=tuple(d["feature_names"]),
            metadata=d.get("metadata") or {},
        )
