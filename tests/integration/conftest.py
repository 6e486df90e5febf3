import pytest

from extproc.sim.fleet import FleetSpec, SimFleet

MODEL = "sim-llama"


@pytest.fixture
async def fleet():
    async with SimFleet(FleetSpec(pods=3, profile="llama3-8b-h100", model=MODEL, time_scale=0.05, seed=1)) as f:
        yield f
