"""The paged KV block pool: every block, its reference count and its prefix-cache hash.

Lifecycle of a block: free (in the LRU free queue, maybe still holding a cached hash) →
allocated to one or more requests (ref_cnt > 0) → freed (ref_cnt 0, back at the tail of the
free queue; its hash stays so a later request can hit it) → evicted when the free queue hands
it out again (its hash is dropped and a "removed" event is published).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class KvEventSink(Protocol):
    """Receives the pool's prefix-cache changes (the router's KV events)."""

    def on_stored(self, block_hashes: list[int], parent_hash: int | None) -> None: ...

    def on_removed(self, block_hashes: list[int]) -> None: ...

    def on_cleared(self) -> None: ...


@dataclass(eq=False)
class Block:
    """One KV block: `block_size` token slots in every layer."""

    block_id: int
    ref_cnt: int = 0
    #: Chained hash of the tokens this block holds, once it is full and cached.
    block_hash: int | None = None


class NoFreeBlocksError(RuntimeError):
    """The pool cannot hand out the blocks asked for."""


class BlockPool:
    """Owns `num_blocks` blocks; free == total once every request has ended."""

    def __init__(
        self, num_blocks: int, enable_caching: bool = True, event_sink: KvEventSink | None = None
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.event_sink = event_sink
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (front = evicted first). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds (a worker's snapshot for the router)."""
        return list(self._cached)

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """Hand out `n` blocks (ref_cnt 1), evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out: list[Block] = []
        evicted: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted and self.event_sink is not None:
            self.event_sink.on_removed(evicted)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-cache hits (pulling free ones out of the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference per block; pass a request's blocks tail first so the tail is
        evicted before the shared head."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache_blocks(self, blocks: list[Block], hashes: list[int], parent_hash: int | None) -> None:
        """Record full blocks under their chained hashes (a no-op without caching)."""
        if not self.enable_caching:
            return
        stored: list[int] = []
        for block, h in zip(blocks, hashes):
            if block.block_hash is not None:
                continue
            block.block_hash = h
            if h not in self._cached:
                self._cached[h] = block
                stored.append(h)
        if stored and self.event_sink is not None:
            self.event_sink.on_stored(stored, parent_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        if self.event_sink is not None:
            self.event_sink.on_cleared()
        return True
