"""Fixtures shared by the engine tests."""

from __future__ import annotations

import logging

import pytest

from splitserve.engine import native


@pytest.fixture
def no_compiler(monkeypatch, caplog):
    """No C compiler on PATH: kernels load as None (with the warning captured in caplog);
    the loaders' caches are emptied before and after."""
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.clear_caches()
    caplog.set_level(logging.WARNING)
    yield caplog
    native.clear_caches()
