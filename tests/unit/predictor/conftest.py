from __future__ import annotations

import pytest
from predictor_helpers import train_small_model

from extproc.predictor.model import LatencyModel


@pytest.fixture(scope="session")
def small_model() -> LatencyModel:
    return train_small_model()
