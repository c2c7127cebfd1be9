"""Where built kernels and tokenizers are kept: ~/.cache/splitserve, or $XDG_CACHE_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.engine import native
from splitserve.engine.cache_home import splitserve_cache
from splitserve.engine.model_loader import tokenizer


def test_xdg_cache_home_moves_both_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "splitserve" / "kernels"
    assert tokenizer.tokenizer_cache_dir() == tmp_path / "splitserve" / "tokenizers"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_means_the_home_cache(monkeypatch, tmp_path, value):
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    if value is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert splitserve_cache("kernels") == tmp_path / ".cache" / "splitserve" / "kernels"
    assert native.cache_dir() == tmp_path / ".cache" / "splitserve" / "kernels"
