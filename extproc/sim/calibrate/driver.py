"""The calibration run: measure the training design on every target, fit, correct once for the simulator's own
serving overhead, validate on the held-out design."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.sim.calibrate.client import ServerFacts, _prefix_hits, run_design, server_facts
from extproc.sim.calibrate.design import Sample, heldout_design, training_design
from extproc.sim.calibrate.fit import COEFS, features, fit
from extproc.sim.calibrate.validate import Comparison, ErrorStats, compare, rel_errors, simulated_pod

if TYPE_CHECKING:
    from extproc.sim.profiles import Profile

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CalibrationResult:
    profile: Profile
    coefficients: dict[str, float]
    facts: ServerFacts
    train_requests: int
    train_fit_error: ErrorStats
    comparisons: list[Comparison]
    seconds: float
    real_prefix_hits: dict[str, float]
    expected_prefix_hits: int
    seed: int
    loadavg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end (shared machines)
    sim_overhead: dict[str, float] = field(default_factory=dict)  # sim-observed minus fitted, per coefficient


async def calibrate(
    targets: Sequence[str],
    *,
    model: str | None,
    name: str,
    accelerator: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    validate: bool = True,
    seed: int | None = None,
    sim_correct: bool = True,
) -> CalibrationResult:
    from extproc.sim.profiles import Profile

    import numpy as np

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    # A fresh seed per run: the real server keeps its prefix cache between runs, and prompts from an earlier
    # run would turn designed misses into hits.
    seed = seed if seed is not None else int.from_bytes(os.urandom(6), "big")
    facts = await server_facts(targets[0], model)
    train = training_design(facts.block_size, seed=seed)
    expected_hits = sum(r.cached_tokens for w in train for lane in w.lanes for r in lane)
    rows: list[list[float]] = []
    ys: list[float] = []
    n_train = 0
    hits: dict[str, float] = {}
    for url in targets:
        h0 = await _prefix_hits(url)
        for wave_samples in await run_design(url, facts.model, train):
            r, y = features(wave_samples)
            rows += r
            ys += y
            n_train += len(wave_samples)
        hits[url] = await _prefix_hits(url) - h0
    coef = fit(rows, ys)
    pred = np.asarray(rows) @ np.asarray([coef[c] for c in COEFS])
    fit_err = rel_errors(ys, pred.tolist())
    profile = Profile(
        name=name,
        model=facts.model,
        accelerator=accelerator,
        b0_ms=round(coef["b0"], 5),
        b1_ms=round(coef["b1"], 7),
        b2_ms=round(coef["b2"], 5),
        a0_ms=round(coef["a0"], 5),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_gpu_blocks=facts.num_gpu_blocks,
        block_size=facts.block_size,
        max_loras=1,
        max_model_len=facts.max_model_len,
        sources=(
            f"fitted by `extproc sim calibrate` against {len(targets)} real vLLM server(s): {n_train} training "
            f"requests (prompt x output x concurrency x cache hit/miss), relative least squares on per-request "
            f"TTFT and decode-time decompositions; block_size/num_gpu_blocks from vllm:cache_config_info"
        ),
    )
    # Sim-overhead correction (one fixed-point step): run the same training design against a simulated pod
    # with the fitted profile, fit the same regression to what the client saw, and subtract the difference
    # (the simulator's own HTTP/event-loop overhead per request and per step) from the real coefficients.
    if sim_correct:
        sim_rows: list[list[float]] = []
        sim_ys: list[float] = []
        with tempfile.TemporaryDirectory(prefix="calibrate-sim-") as wd:
            async with simulated_pod(profile, facts.model, Path(wd)) as sim_url:
                for wave_samples in await run_design(sim_url, facts.model, training_design(facts.block_size, seed=seed)):
                    r, y = features(wave_samples)
                    sim_rows += r
                    sim_ys += y
        seen = fit(sim_rows, sim_ys)
        corrected = {c: max(0.0, coef[c] - (seen[c] - coef[c])) for c in COEFS}
        logger.info("sim overhead correction: fitted %s, sim shows %s, corrected %s", coef, seen, corrected)
        sim_overhead = {c: seen[c] - coef[c] for c in COEFS}
        coef = corrected
        profile = profile.replace(
            b0_ms=round(coef["b0"], 5), b1_ms=round(coef["b1"], 7), b2_ms=round(coef["b2"], 5), a0_ms=round(coef["a0"], 5),
            sources=profile.sources + "; corrected once for the simulator's own serving overhead (sim fit minus real fit)",
        )  # fmt: skip
    else:
        sim_overhead = {}
    comparisons: list[Comparison] = []
    if validate:
        # Each held-out wave runs on the real server and then on a fresh simulated pod, back to back, so both
        # see the same background load of the machine.
        held = heldout_design(facts.block_size, seed=seed + 1)
        with tempfile.TemporaryDirectory(prefix="calibrate-sim-") as wd:
            for url in targets:
                real_samples: list[Sample] = []
                sim_samples: list[Sample] = []
                for wave in held:
                    real_samples += (await run_design(url, facts.model, [wave]))[0]
                    async with simulated_pod(profile, facts.model, Path(wd)) as sim_url:
                        sim_samples += (await run_design(sim_url, facts.model, [wave]))[0]
                comparisons.append(compare(url, real_samples, sim_samples))
    return CalibrationResult(
        profile,
        coef,
        facts,
        n_train,
        fit_err,
        comparisons,
        time.perf_counter() - t0,
        hits,
        expected_hits,
        seed,
        (load0, os.getloadavg()[0]),
        sim_overhead,
    )
