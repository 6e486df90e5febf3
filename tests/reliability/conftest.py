"""Fixtures for the reliability tests (helpers live in reliability_lib)."""

from reliability_lib import fleet  # noqa: F401  (pytest fixture)
