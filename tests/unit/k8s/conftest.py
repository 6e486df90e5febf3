"""Fixtures for the Kubernetes discovery tests (the fake API server lives in k8s_fake.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from k8s_fake import FakeApiServer


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()
