"""Fixtures for the built-in plugin tests (helpers live in plugin_testlib)."""

from plugin_testlib import ctx, cycle  # noqa: F401  (pytest fixtures)
