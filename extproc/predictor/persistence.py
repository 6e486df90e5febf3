"""Saving and loading latency models.

One JSON file holds the four LightGBM model strings (``Booster.model_to_string``), the feature list, the
pod-class codes, the quantile alpha, the model version and free-form metadata (see ``LatencyModel.to_dict``).
Writes are atomic: a temporary file in the same directory, fsync, then ``os.replace`` — a crash leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from extproc.predictor.model import LatencyModel

log = logging.getLogger(__name__)

STATE_MODEL_FILE = "latency-predictor.json"
# The warm-start model shipped as package data (in the wheel and the image). ``warmStart: builtin`` names it.
BUILTIN = "builtin"
BUNDLED_MODEL = str(Path(__file__).resolve().parent / "data" / STATE_MODEL_FILE)


def save_model(model: LatencyModel, path: str | os.PathLike[str]) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".latency-predictor.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(model.to_dict(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_model(path: str | os.PathLike[str]) -> LatencyModel:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return LatencyModel.from_dict(d)


def state_model_path(state_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(state_dir), STATE_MODEL_FILE)


def resolve_model_path(path: str) -> str | None:
    """An existing file: ``builtin`` (the packaged model), ``path`` as given, else relative to the source
    checkout root."""
    if path == BUILTIN:
        return BUNDLED_MODEL if os.path.exists(BUNDLED_MODEL) else None
    if os.path.exists(path):
        return path
    root = Path(__file__).resolve().parents[2]
    cand = root / path
    if cand.exists():
        return str(cand)
    return None


def load_initial_model(state_dir: str | None, warm_start: str | None) -> tuple[LatencyModel | None, str]:
    """The model to start with: the state directory's saved model, else the warm-start file, else none.

    Returns (model, where it came from). A broken file is logged and skipped, never fatal.
    """
    candidates: list[tuple[str, str]] = []
    if state_dir:
        candidates.append(("state", state_model_path(state_dir)))
    if warm_start:
        p = resolve_model_path(warm_start)
        if p is None:
            log.warning("warm-start predictor model not found", extra={"path": warm_start})
        else:
            candidates.append(("warm-start", p))
    for source, p in candidates:
        if not os.path.exists(p):
            continue
        try:
            m = load_model(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("predictor model not loaded", extra={"path": p, "error": str(e)})
            continue
        except Exception as e:  # lightgbm raises LightGBMError on a corrupt model string
            log.warning("predictor model not loaded", extra={"path": p, "error": str(e)})
            continue
        log.info("predictor model loaded", extra={"path": p, "source": source, "version": m.version})
        return m, source
    return None, "none"
