"""Chained block hashes: the one definition shared by the engine's prefix cache and the router.

A block's hash covers its parent block's hash and its own token ids, so equal hashes mean
equal prefixes (up to a 64-bit collision). Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

#: Parent hash of the first block of every sequence.
ROOT_HASH = 0


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block: blake2b-64 over the parent hash and the token ids (int32 LE)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype="<i4").tobytes())
    return int.from_bytes(h.digest(), "little", signed=False)


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block is skipped)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    raw = np.asarray(token_ids[: n_full * block_size], dtype="<i4").tobytes()
    stride = 4 * block_size
    hashes: list[int] = []
    parent = parent_hash
    blake2b = hashlib.blake2b
    for i in range(n_full):
        h = blake2b(parent.to_bytes(8, "little", signed=False), digest_size=8)
        h.update(raw[i * stride : (i + 1) * stride])
        parent = int.from_bytes(h.digest(), "little", signed=False)
        hashes.append(parent)
    return hashes
