"""`Router`: the KV index, the load view and the cost model behind one small API.

Lifecycle, as the frontend (or `splitserve router`) drives it:
  1. a worker appears (discovery): `add_worker(id, pool, block_size=...)` — a block-size
     mismatch raises here; then its KV event stream feeds `apply_events(bytes)`; an
     `EventGap` from it means: fetch the worker's snapshot and pass it to `load_snapshot`;
     its Stats replies feed `update_stats`;
  2. a request comes: `select(token_ids, role, request_id=...)` picks a worker of the role's
     pool and books the request in the load view (disaggregated: once with Role.PREFILL,
     once with Role.DECODE; whether to prefill remotely is the frontend's decision,
     frontend/disagg.py); `NoWorkerAvailable` → 503 with Retry-After `exc.retry_after_s`;
  3. `on_first_token(request_id)` when its first token streams, `on_finished(request_id)`
     when it ends (finished, aborted or failed);
  4. the worker leaves: `remove_worker(id)` drops its blocks and its load.

Not thread-safe: drive one Router from one thread (the event loop).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from splitserve.engine.kv_hash import hash_token_blocks
from splitserve.router.config import RouterConfig
from splitserve.router.errors import NoWorkerAvailable, UnknownWorker
from splitserve.router.events import KvEventBatch, KvSnapshot, decode_batch, decode_snapshot
from splitserve.router.index import ApplyResult, KvIndex
from splitserve.router.load import LoadTracker, StatsLike
from splitserve.router.policy import Role, choose

#: Worker pools.
POOLS = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class Selection:
    """The worker chosen for one role of one request."""

    worker_id: str
    #: Leading prompt blocks the worker already holds.
    overlap_blocks: int
    #: Its cost under the mode's formula (kv formula for round-robin/random, informational).
    cost: float
    #: Full blocks of the prompt.
    num_blocks: int
    role: Role


def _pool_of(role: Role) -> str:
    return "prefill" if role is Role.PREFILL else "decode"


class Router:
    """KV-aware choice of prefill and decode workers; see the module docstring."""

    def __init__(
        self,
        config: RouterConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else RouterConfig()
        cfg = self.config
        self.rng = rng if rng is not None else random.Random(cfg.seed)
        self.index = KvIndex(
            cfg.block_size,
            resync_buffer_batches=cfg.resync_buffer_batches,
            approx_ttl_s=cfg.approx_ttl_s,
            approx_max_blocks=cfg.approx_max_blocks,
            clock=clock,
        )
        self.load = LoadTracker(
            stats_ttl_s=cfg.stats_ttl_s, request_timeout_s=cfg.request_timeout_s, clock=clock
        )
        self._pools: dict[str, list[str]] = {p: [] for p in POOLS}
        self._pool_of_worker: dict[str, str] = {}
        self._turns: dict[str, int] = {p: 0 for p in POOLS}
        self._num_approx = 0
        self._counters = {
            "requests": 0,
            "remote_prefills": 0,
            "prompt_blocks": 0,
            "overlap_blocks": 0,
            "no_worker": 0,
        }

    # -- workers ------------------------------------------------------------------------------
    def add_worker(
        self,
        worker_id: str,
        pool: str = "decode",
        *,
        block_size: int,
        approximate: bool = False,
        total_blocks: int | None = None,
    ) -> None:
        """Subscribe a worker to a pool ("prefill" | "decode"; aggregated workers are
        "decode"). Raises BlockSizeMismatch if `block_size` is not the router's.
        `approximate`: the worker publishes no KV events; the router remembers its own
        routing decisions for `approx_ttl_s` instead."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {'|'.join(POOLS)}, got {pool!r}")
        self.index.add_worker(
            worker_id, block_size, approximate=approximate, capacity=total_blocks
        )
        self.load.add_worker(worker_id, total_blocks)
        self._pools[pool].append(worker_id)
        self._pool_of_worker[worker_id] = pool
        self._num_approx += approximate

    def remove_worker(self, worker_id: str) -> None:
        pool = self._pool_of_worker.pop(worker_id, None)
        if pool is None:
            return
        self._num_approx -= self.index.is_approximate(worker_id)
        self._pools[pool].remove(worker_id)
        self.index.remove_worker(worker_id)
        self.load.remove_worker(worker_id)

    def workers(self, pool: str | None = None) -> list[str]:
        if pool is None:
            return list(self._pool_of_worker)
        return list(self._pools[pool])

    # -- feeds --------------------------------------------------------------------------------
    def apply_events(self, data: bytes | KvEventBatch) -> ApplyResult:
        """One encoded (or decoded) batch from a worker's event stream. Raises EventGap:
        fetch that worker's snapshot and call `load_snapshot`."""
        batch = decode_batch(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return self.index.apply(batch)

    def load_snapshot(self, data: bytes | KvSnapshot) -> int:
        """A worker's snapshot (encoded or decoded); replays events buffered since."""
        snap = decode_snapshot(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return self.index.load_snapshot_message(snap)

    def update_stats(self, worker_id: str, stats: StatsLike) -> None:
        """A worker's Stats reply (engine.outputs.EngineStats or the RPC message)."""
        if worker_id not in self._pool_of_worker:
            raise UnknownWorker(worker_id)
        self.load.update_stats(worker_id, stats)

    # -- choice -------------------------------------------------------------------------------
    def hash_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """The prompt's chained block hashes (pass them to several calls to hash once)."""
        return hash_token_blocks(token_ids, self.config.block_size)

    def find_matches(self, token_ids: Sequence[int]) -> dict[str, int]:
        """{worker: leading prompt blocks it holds} over both pools."""
        return self._matches(token_ids, None)

    def select(
        self,
        token_ids: Sequence[int],
        role: Role | str = Role.AGGREGATED,
        *,
        block_hashes: Sequence[int] | None = None,
        request_id: str | None = None,
        exclude: Collection[str] = (),
    ) -> Selection:
        """Pick a worker of the role's pool. With `request_id` the request is booked in the
        load view (then call on_first_token / on_finished). Raises NoWorkerAvailable.
        `block_hashes` (optional) are the prompt's chained hashes if already computed."""
        role = Role(role)
        matches = self._matches(token_ids, block_hashes)
        sel = self._select(role, matches, len(token_ids), exclude)
        if request_id is not None:
            self._commit(request_id, sel, token_ids, block_hashes)
        return sel

    def _matches(
        self, token_ids: Sequence[int], block_hashes: Sequence[int] | None
    ) -> dict[str, int]:
        if self._num_approx:
            self.index.expire()
        if block_hashes is not None:
            return self.index.find_matches_for_hashes(block_hashes)
        return self.index.find_matches(token_ids)  # hashes lazily, stops at the last match

    def _select(
        self, role: Role, matches: dict[str, int], num_tokens: int, exclude: Collection[str]
    ) -> Selection:
        cfg = self.config
        pool_name = _pool_of(role)
        pool = self._pools[pool_name]
        if not pool:
            self._counters["no_worker"] += 1
            raise NoWorkerAvailable(f"no {pool_name} workers", cfg.retry_after_s)
        ids, prefill, active = self.load.eligible(
            pool, cfg.max_active_blocks_frac, cfg.max_queue, exclude
        )
        if not ids:
            self._counters["no_worker"] += 1
            raise NoWorkerAvailable(
                f"all {len(pool)} {pool_name} workers are busy", cfg.retry_after_s
            )
        overlaps = [matches.get(w, 0) for w in ids] if matches else [0] * len(ids)
        num_blocks = num_tokens // cfg.block_size
        turn = self._turns[pool_name]
        self._turns[pool_name] = turn + 1
        cached = None
        if len(ids) > 1 and cfg.mode == "kv" and cfg.temperature == 0:
            cached = [self.index.num_worker_blocks(w) for w in ids]
        i, cost = choose(
            role, overlaps, prefill, active, num_tokens, num_blocks, cfg, self.rng, turn,
            cached,
        )
        return Selection(ids[i], overlaps[i], cost, num_blocks, role)

    def _commit(
        self,
        request_id: str,
        sel: Selection,
        token_ids: Sequence[int],
        block_hashes: Sequence[int] | None,
    ) -> None:
        bs = self.config.block_size
        num_tokens = len(token_ids)
        blocks = -(-num_tokens // bs)
        uncached = max(0, num_tokens - sel.overlap_blocks * bs)
        # The full blocks' hashes: requests sharing a prefix share its blocks in the load view.
        hashes = block_hashes if block_hashes is not None else self.hash_tokens(token_ids)
        if sel.role is Role.PREFILL:
            self.load.on_routed(
                request_id, sel.worker_id, prefill_tokens=uncached, blocks=blocks,
                prefill_only=True, block_hashes=hashes,
            )
            self._counters["remote_prefills"] += 1
        else:
            self.load.on_routed(
                request_id, sel.worker_id,
                prefill_tokens=0 if sel.role is Role.DECODE else uncached, blocks=blocks,
                block_hashes=hashes,
            )
            self._counters["requests"] += 1
            self._counters["prompt_blocks"] += sel.num_blocks
            self._counters["overlap_blocks"] += sel.overlap_blocks
        if self._num_approx and self.index.is_approximate(sel.worker_id):
            self.index.record_routed(sel.worker_id, hashes)

    # -- request progress ---------------------------------------------------------------------
    def on_first_token(self, request_id: str) -> None:
        self.load.on_first_token(request_id)

    def on_finished(self, request_id: str) -> None:
        """The request ended (finished, aborted, failed): release its load."""
        self.load.on_finished(request_id)

    # -- introspection ------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Counters for the frontend's Prometheus metrics; prefix_hit_rate = overlap blocks /
        prompt blocks over the requests booked so far (decode-pool selections)."""
        c = dict(self._counters)
        c["prefix_hit_rate"] = (
            c["overlap_blocks"] / c["prompt_blocks"] if c["prompt_blocks"] else 0.0
        )
        c["indexed_blocks"] = self.index.num_blocks
        c["tracked_requests"] = self.load.num_requests()
        return c
