"""The fit: per-request regressor rows reconstructed from a wave's client-side timeline, and a robust relative
non-negative least-squares fit of the engine step model's coefficients (a0, b0, b1, b2); see the package
docstring for the decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from extproc.sim.calibrate.design import Sample

COEFS: Final[tuple[str, ...]] = ("a0", "b0", "b1", "b2")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def features(samples: Sequence[Sample]) -> tuple[list[list[float]], list[float]]:
    """Regressor rows for (a0, b0, b1, b2) and their targets (ms) for one wave's samples.

    Each request gives an e2e row (TTFT terms + decode terms; its end time is exact even when the server
    coalesced tokens into one chunk) and, when its first chunk held exactly one token, a TTFT row. The terms
    come from the client-side timeline of the whole wave, see the module docstring."""
    rows: list[list[float]] = []
    ys: list[float] = []
    for s in samples:
        miss = max(1, s.prompt_tokens - s.req.cached_tokens)
        # --- TTFT: requests prefilled with or before this one, after it was sent
        admitted, prefill = 1.0, float(miss)
        busy = False
        decoding_at_prefill = 0.0
        for o in samples:
            if o is s:
                continue
            if o.t_send < s.t_send < o.t_end:
                busy = True
            if s.t_send <= o.t_first <= s.t_first and o.t_send <= s.t_first:
                admitted += 1
                prefill += max(1, o.prompt_tokens - o.req.cached_tokens)
            if o.t_first < s.t_first < o.t_end:
                decoding_at_prefill += 1
        steps = 1.0 + (0.5 if busy else 0.0)
        ttft_row = [admitted, steps, prefill, decoding_at_prefill * steps]
        if s.clean_first:
            rows.append(ttft_row)
            ys.append(s.ttft * 1000.0)
        # --- decode: out - 1 steps, batch = decoding sequences, plus prefills landing meanwhile
        n = s.completion_tokens - 1
        dec_row = [0.0, 0.0, 0.0, 0.0]
        if n > 0 and s.decode > 0:
            dur = s.decode
            conc = 1.0
            others_prefill, others_admitted = 0.0, 0.0
            for o in samples:
                if o is s:
                    continue
                conc += _overlap(s.t_first, s.t_end, o.t_first, o.t_end) / dur
                if s.t_first < o.t_first < s.t_end:
                    others_admitted += 1
                    others_prefill += max(1, o.prompt_tokens - o.req.cached_tokens)
            dec_row = [others_admitted, float(n), others_prefill, conc * n]
        rows.append([a + b for a, b in zip(ttft_row, dec_row, strict=True)])
        ys.append(s.e2e * 1000.0)
    return rows, ys


def _nnls_rel(x: Any, y: Any) -> Any:
    """Relative least squares with non-negative coefficients (drop the most negative, refit)."""
    import numpy as np

    w = 1.0 / y
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        del active[int(np.argmin(sol))]
    return coef


def fit(rows: Sequence[Sequence[float]], ys: Sequence[float], *, trim: float = 3.0, rounds: int = 3) -> dict[str, float]:
    """Robust relative least squares for (a0, b0, b1, b2) in ms, non-negative.

    Rows whose relative residual exceeds ``trim`` × the median absolute relative residual are dropped and the
    fit repeated (``rounds`` times at most): on a shared CPU a few requests are delayed by other processes."""
    import numpy as np

    x = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    keep = y > 0
    x, y = x[keep], y[keep]
    coef = _nnls_rel(x, y)
    for _ in range(rounds):
        r = np.abs(x @ coef - y) / y
        mad = float(np.median(r))
        inl = r <= max(trim * mad, 0.05)
        if inl.all() or inl.sum() < x.shape[1] * 4:
            break
        x, y = x[inl], y[inl]
        coef = _nnls_rel(x, y)
    return {name: float(v) for name, v in zip(COEFS, coef, strict=True)}
