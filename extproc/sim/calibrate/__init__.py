"""Calibrate a simulator ``Profile`` against real vLLM servers, and launch those servers.

``extproc sim calibrate --target URL [--target URL2] --out profile.yaml [--report FILE]``

1. **Design.** A training request set spans prompt lengths × output lengths × concurrency levels × prefix-cache
   hit/miss. Prompts are token-id lists (``/v1/completions`` accepts them), so prompt lengths and shared prefixes
   are exact and no tokenizer is involved; ``ignore_eos`` + ``min_tokens`` pin the output length.
2. **Measure.** Every request streams; the client records send time, first-token time and end time.
3. **Fit.** Each request gives two linear equations in the engine step model the simulator uses
   (``step = b0 + b1·uncached prefill tokens + b2·decoding sequences + a0·admitted requests``, see
   ``extproc.sim.engine``), with the regressors reconstructed from the client-side timeline of all requests:

   - TTFT ≈ a0·(requests admitted up to its first token) + b0·(steps: its own prefill step, plus half a step of
     waiting when the engine was busy) + b1·(uncached prompt tokens prefilled with or before it)
     + b2·(sequences decoding alongside its prefill);
   - decode time (e2e − TTFT) ≈ b0·(out − 1) + b2·Σ batch size over its decode steps (time-weighted mean
     decoding concurrency × (out − 1)) + b1·(prompt tokens of requests prefilled meanwhile) + a0·(their count).

   Rows are scaled by 1/target (relative least squares, ``numpy.linalg.lstsq``); coefficients that come out
   negative are dropped and the rest refitted. ``block_size`` and ``num_gpu_blocks`` come from the server's
   ``vllm:cache_config_info``, ``max_model_len`` from ``/v1/models``.
4. **Validate.** A held-out request set (other lengths, other concurrency levels) runs against the real server
   and against a simulated pod running the fitted profile; the report gives median and p90 relative errors
   of TTFT and e2e latency, per request and per cell.

One module per concern: ``design`` (the request sets, step 1), ``client`` (the HTTP client, step 2, and the
server's facts), ``fit`` (step 3), ``validate`` (step 4), ``driver`` (the run), ``report`` (Markdown), ``cli``
(``extproc sim calibrate``), and ``launcher`` (the real-vLLM launcher used by ``--launch``, ``tests/real_vllm``
and ``scripts/real_vllm_serve.py``). This package re-exports their public names.
"""

from __future__ import annotations

from extproc.sim.calibrate.cli import add_arguments, main, run
from extproc.sim.calibrate.client import ServerFacts, run_design, run_wave, send_one, server_facts
from extproc.sim.calibrate.design import CalRequest, Sample, Wave, _Rng, design, heldout_design, training_design
from extproc.sim.calibrate.driver import CalibrationResult, calibrate
from extproc.sim.calibrate.fit import COEFS, features, fit
from extproc.sim.calibrate.launcher import (
    REPO_ROOT,
    SETUP_SCRIPT,
    SETUP_STAMP,
    VENV_ENV,
    VllmLaunchSpec,
    VllmServer,
    launch_vllm,
    real_vllm_servers,
    vllm_python,
    vllm_venv,
)
from extproc.sim.calibrate.report import render_report
from extproc.sim.calibrate.validate import Comparison, ErrorStats, compare, rel_errors, simulated_pod

__all__ = [
    "COEFS", "REPO_ROOT", "SETUP_SCRIPT", "SETUP_STAMP", "VENV_ENV",
    "CalRequest", "CalibrationResult", "Comparison", "ErrorStats", "Sample", "ServerFacts", "VllmLaunchSpec",
    "VllmServer", "Wave", "_Rng",
    "add_arguments", "calibrate", "compare", "design", "features", "fit", "heldout_design", "launch_vllm", "main",
    "real_vllm_servers", "rel_errors", "render_report", "run", "run_design", "run_wave", "send_one",
    "server_facts", "simulated_pod", "training_design", "vllm_python", "vllm_venv",
]  # fmt: skip
