"""Held-out validation: the same held-out waves against the real server and a simulated pod running the fitted
profile, and their relative errors per request and per design cell."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.sim.calibrate.design import Sample

if TYPE_CHECKING:
    from extproc.sim.profiles import Profile


@dataclass(slots=True)
class ErrorStats:
    n: int
    median: float
    p90: float


def _pct(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rel_errors(real: Sequence[float], sim: Sequence[float]) -> ErrorStats:
    errs = [abs(s - r) / r for r, s in zip(real, sim, strict=True) if r > 0]
    return ErrorStats(len(errs), _pct(errs, 0.5), _pct(errs, 0.9))


@dataclass(slots=True)
class Comparison:
    target: str
    per_request: dict[str, ErrorStats] = field(default_factory=dict)  # metric -> stats
    per_cell: dict[str, ErrorStats] = field(default_factory=dict)
    cells: list[tuple[str, int, float, float, float, float]] = field(default_factory=list)
    # (cell, n, real ttft ms, sim ttft ms, real e2e ms, sim e2e ms)


def compare(target: str, real: Sequence[Sample], sim: Sequence[Sample]) -> Comparison:
    by_key = {s.req.key: s for s in sim}
    pairs = [(r, by_key[r.req.key]) for r in real if r.req.key in by_key]
    cmp = Comparison(target)
    # TTFT only where both first-token times are trustworthy (see Sample.clean_first); e2e everywhere.
    clean = [(r, s) for r, s in pairs if r.clean_first and s.clean_first]
    cmp.per_request["ttft"] = rel_errors([r.ttft for r, _ in clean], [s.ttft for _, s in clean])
    cmp.per_request["e2e"] = rel_errors([r.e2e for r, _ in pairs], [s.e2e for _, s in pairs])
    cells: dict[str, list[tuple[Sample, Sample]]] = {}
    for r, s in pairs:
        cells.setdefault(r.req.cell, []).append((r, s))
    for cell, ps in sorted(cells.items()):
        cps = [(r, s) for r, s in ps if r.clean_first and s.clean_first]
        cmp.cells.append(
            (
                cell,
                len(ps),
                1000 * statistics.fmean(r.ttft for r, _ in cps) if cps else math.nan,
                1000 * statistics.fmean(s.ttft for _, s in cps) if cps else math.nan,
                1000 * statistics.fmean(r.e2e for r, _ in ps),
                1000 * statistics.fmean(s.e2e for _, s in ps),
            )
        )
    tc = [c for c in cmp.cells if not math.isnan(c[2])]
    cmp.per_cell["ttft"] = rel_errors([c[2] for c in tc], [c[3] for c in tc])
    cmp.per_cell["e2e"] = rel_errors([c[4] for c in cmp.cells], [c[5] for c in cmp.cells])
    return cmp


@contextlib.asynccontextmanager
async def simulated_pod(profile: Profile, model: str, workdir: Path) -> AsyncIterator[str]:
    """One simulated vLLM pod running ``profile`` in its own process (``extproc sim --pods 1``), like the real
    server is; yields its base URL and stops the process on exit."""
    path = workdir / f"{profile.name}.yaml"
    profile.to_yaml(path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "sim", "--pods", "1", "--profile", str(path), "--model", model,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"simulated pod exited with {await proc.wait()} before listening")
        endpoint = json.loads(line)["endpoints"][0]
        yield f"http://{endpoint}"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
