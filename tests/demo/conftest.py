"""Fixtures of the demo tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One ``BETAKD_CACHE`` for the quick demos of a test session: the converted data and
    the quick teacher they share are built once."""
    return tmp_path_factory.mktemp("betakd-cache")
