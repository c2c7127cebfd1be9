"""Chained block hashes: the one definition shared by the engine's prefix cache and the router.

A block's hash covers its parent block's hash and its own token ids, so equal hashes mean
equal prefixes (up to a 64-bit collision). Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
import struct
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
    n_tok = n_full * block_size
    # The router hashes every prompt on its request path: this loop is kept tight (struct
    # packing of lists, digests chained as bytes — an 8-byte LE digest *is* the parent hash's
    # bytes — and one unpack at the end). Same hashes as hash_block_tokens, block by block.
    raw: bytes | None = None
    if not isinstance(token_ids, np.ndarray):
        try:
            raw = struct.pack(f"<{n_tok}i", *token_ids[:n_tok])
        except struct.error:
            raw = None  # out-of-range id: let numpy raise its usual error below
    if raw is None:
        raw = np.asarray(token_ids[:n_tok], dtype="<i4").tobytes()
    stride = 4 * block_size
    digest = parent_hash.to_bytes(8, "little", signed=False)
    blake2b = hashlib.blake2b
    digests: list[bytes] = []
    append = digests.append
    for i in range(0, n_tok * 4, stride):
        digest = blake2b(digest + raw[i : i + stride], digest_size=8).digest()
        append(digest)
    return list(struct.unpack(f"<{n_full}Q", b"".join(digests)))
