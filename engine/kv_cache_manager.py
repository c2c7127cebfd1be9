"""Gives requests their KV blocks: prefix-cache lookup, slot allocation, caching of full
blocks as they fill, and freeing."""

from __future__ import annotations

from .block_pool import Block, BlockPool
from .kv_hash import ROOT_HASH, hash_token_blocks
from .request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def _ensure_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend req.block_hashes to cover the full blocks among the first num_tokens."""
        bs = self.block_size
        have = len(req.block_hashes)
        want = num_tokens // bs
        if want <= have:
            return
        parent = req.block_hashes[-1] if have else ROOT_HASH
        req.block_hashes.extend(
            hash_token_blocks(req.all_token_ids[have * bs : want * bs], bs, parent)
        )

    def find_cached_prefix(self, req: Request) -> list[Block]:
        """Leading blocks of `req` already in the prefix cache. At least one token is always
        left to compute, so the step that follows produces logits."""
        if not self.enable_caching or req.num_computed_tokens:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._ensure_hashes(req, max_blocks * self.block_size)
        hits: list[Block] = []
        for h in req.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate(self, req: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Make req's blocks cover its computed tokens + cached hits + num_new_tokens.
        Returns False (changing nothing) when the pool is short."""
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(req.blocks) - len(cached)
        reclaimed = sum(1 for b in cached if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimed:
            return False
        if cached:
            self.pool.touch(cached)
            req.blocks.extend(cached)
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Publish req's newly full, computed blocks to the prefix cache."""
        if not self.enable_caching:
            return
        n_full = min(req.num_computed_tokens // self.block_size, len(req.blocks))
        done = req.num_published_blocks
        if n_full <= done:
            return
        self._ensure_hashes(req, n_full * self.block_size)
        parent = req.block_hashes[done - 1] if done else None
        self.pool.cache_blocks(req.blocks[done:n_full], req.block_hashes[done:n_full], parent)
        req.num_published_blocks = n_full

    def free(self, req: Request) -> None:
        """Release every block of req, tail first (the tail is evicted before the shared head)."""
        if req.blocks:
            self.pool.free(reversed(req.blocks))
        req.blocks = []
        req.num_published_blocks = 0
