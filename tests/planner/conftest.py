"""Fixtures for planner tests: small analytic profiles (see factories.py)."""

from __future__ import annotations

import pytest

from .factories import analytic_profile, write_profile


@pytest.fixture
def profile():
    """The default analytic profile (prefill 20k tok/s, ITL = 10 + 0.1 b + 0.05 b ctx/1000 ms)."""
    return analytic_profile()


@pytest.fixture
def profile_path(tmp_path):
    """The default analytic profile written to a temporary JSON file."""
    return write_profile(tmp_path / "profile.json")
