"""Fixtures of the real-vLLM tier: two real vLLM CPU servers on the tiny local model, shared by the session.

The tier needs the venv made by ``scripts/real_vllm_setup.sh``. Without it the tests SKIP with a reason,
except under CI (env ``CI`` set), where the CI script runs the setup first and a missing venv is a failure.
Servers start once per session (about 30-40 s on two cores), on free ports, each bound to its own core, with
KV events on; the second one has LoRA enabled so ``vllm:lora_requests_info`` exists too. Every process group
is killed at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from extproc.sim.calibrate import (
    SETUP_SCRIPT,
    VllmLaunchSpec,
    VllmServer,
    real_vllm_servers,
    vllm_python,
    vllm_venv,
)
from extproc.sim.tiny_model import build_tiny_model

MODEL = "tiny"


def _require_venv() -> None:
    if vllm_python() is not None:
        return
    msg = f"real vLLM venv missing at {vllm_venv()} (run {SETUP_SCRIPT})"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI is set, so the real-vLLM tier must run", pytrace=False)
    pytest.skip(msg)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real_vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_pods(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[VllmServer]]:
    """Two real vLLM servers: ``[plain, lora-enabled]``."""
    _require_venv()
    specs = [
        VllmLaunchSpec(tiny_model_dir, served_model_name=MODEL),
        VllmLaunchSpec(tiny_model_dir, served_model_name=MODEL, enable_lora=True),
    ]
    async with real_vllm_servers(specs, workdir=tmp_path_factory.mktemp("real-vllm"), name_prefix="pod") as servers:
        yield servers
