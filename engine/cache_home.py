"""Where splitserve keeps what it builds once and reuses (compiled kernels, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def splitserve_cache(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/splitserve/<parts>`, or `~/.cache/splitserve/<parts>` where that is
    unset or empty (the XDG base-directory rule pip and Hugging Face follow)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "splitserve", *parts)
