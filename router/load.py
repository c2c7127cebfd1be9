"""The router's view of each worker's load.

Lifecycle of one routed request in the view: `on_routed` (route time: its uncached prompt
tokens count as prefill in flight, its blocks as active, it waits for its first token) →
`on_first_token` (its prefill is done; on a prefill worker the whole entry goes, the
blocks being handed to the decode worker) → `on_finished` (its blocks are released).

Active blocks count each KV block once: requests routed with their prompt's chained block
hashes share the blocks of a common prefix (per worker, a reference count per hash), as the
worker's prefix cache shares them; only their other blocks (partial tail) are their own.

The workers' Stats reconcile the view: while fresh (< `stats_ttl_s`), the reported used
blocks and waiting requests are floors under the tracked figures (work the router did not
route, or did not see finish), and a worker reporting itself idle drops tracked requests
older than `stats_ttl_s` (completions the router never heard of). Entries older than
`request_timeout_s` are dropped too, so the view cannot leak.

Not thread-safe: one view, one thread (the router's event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class StatsLike(Protocol):
    """What the router reads from a worker's Stats (engine.outputs.EngineStats has it)."""

    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int


@dataclass(frozen=True, slots=True)
class LoadView:
    """One worker's load as the cost model sees it."""

    #: Uncached prompt tokens routed here whose first token has not come yet.
    prefill_tokens: int
    #: KV blocks of requests running here (tracked, floored by fresh Stats).
    active_blocks: int
    #: Requests waiting for their first token (tracked, floored by fresh Stats).
    num_waiting: int
    #: Size of the worker's block pool; None while unknown.
    total_blocks: int | None

    @property
    def active_blocks_frac(self) -> float | None:
        if not self.total_blocks:
            return None
        return self.active_blocks / self.total_blocks

    def is_busy(self, max_active_blocks_frac: float, max_queue: int | None) -> bool:
        return is_busy(
            self.active_blocks, self.num_waiting, self.total_blocks,
            max_active_blocks_frac, max_queue,
        )


def is_busy(
    active_blocks: int,
    num_waiting: int,
    total_blocks: int | None,
    max_active_blocks_frac: float,
    max_queue: int | None,
) -> bool:
    """A worker above `max_active_blocks_frac` of its pool (when its size is known) or with
    `max_queue` requests waiting is skipped by the router."""
    if total_blocks and active_blocks > max_active_blocks_frac * total_blocks:
        return True
    return max_queue is not None and num_waiting >= max_queue


class _Entry:
    __slots__ = ("worker_id", "prefill_tokens", "private", "hashes", "waiting", "prefill_only",
                 "t")

    def __init__(
        self, worker_id: str, prefill_tokens: int, private: int, hashes: tuple[int, ...],
        prefill_only: bool, t: float,
    ) -> None:
        self.worker_id = worker_id
        self.prefill_tokens = prefill_tokens
        #: Blocks only this request holds; `hashes`: its full blocks, shared by hash.
        self.private = private
        self.hashes = hashes
        self.waiting = True
        self.prefill_only = prefill_only
        self.t = t


class _WorkerLoad:
    __slots__ = (
        "prefill_tokens", "blocks", "shared", "waiting", "entries", "total_blocks",
        "reported_used", "reported_waiting", "stats_t",
    )

    def __init__(self, total_blocks: int | None) -> None:
        self.prefill_tokens = 0
        #: Unique active blocks: the entries' private blocks plus len(shared).
        self.blocks = 0
        #: Block hash -> entries holding it.
        self.shared: dict[int, int] = {}
        self.waiting = 0
        self.entries: dict[str, _Entry] = {}
        self.total_blocks = total_blocks
        self.reported_used = 0
        self.reported_waiting = 0
        self.stats_t = float("-inf")


class LoadTracker:
    """Per-worker prefill tokens in flight and active blocks; see the module docstring."""

    def __init__(
        self,
        *,
        stats_ttl_s: float = 10.0,
        request_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats_ttl_s = stats_ttl_s
        self._timeout_s = request_timeout_s
        self._clock = clock
        self._workers: dict[str, _WorkerLoad] = {}
        # request id -> its entries (a disaggregated request has a prefill and a decode one)
        self._requests: dict[str, list[_Entry]] = {}
        self._next_gc = clock() + min(request_timeout_s, 60.0)

    # -- workers ------------------------------------------------------------------------------
    def add_worker(self, worker_id: str, total_blocks: int | None = None) -> None:
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already tracked")
        self._workers[worker_id] = _WorkerLoad(total_blocks)

    def remove_worker(self, worker_id: str) -> None:
        wl = self._workers.pop(worker_id, None)
        if wl is None:
            return
        for rid, entry in list(wl.entries.items()):
            self._drop_entry(rid, entry, wl)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def update_stats(self, worker_id: str, stats: StatsLike) -> None:
        """Reconcile with a worker's Stats (num_waiting, num_running, free/total blocks)."""
        wl = self._workers.get(worker_id)
        if wl is None:
            return
        now = self._clock()
        wl.total_blocks = stats.num_total_blocks or wl.total_blocks
        wl.reported_used = max(0, stats.num_total_blocks - stats.num_free_blocks)
        wl.reported_waiting = stats.num_waiting
        wl.stats_t = now
        if stats.num_waiting == 0 and stats.num_running == 0 and wl.entries:
            cutoff = now - self._stats_ttl_s
            for rid, entry in list(wl.entries.items()):
                if entry.t < cutoff:
                    self._drop_entry(rid, entry, wl)
        self._maybe_gc(now)

    # -- requests -----------------------------------------------------------------------------
    def on_routed(
        self,
        request_id: str,
        worker_id: str,
        *,
        prefill_tokens: int,
        blocks: int,
        prefill_only: bool = False,
        block_hashes: Sequence[int] = (),
    ) -> None:
        """A request was sent to `worker_id`: `prefill_tokens` to compute, `blocks` to hold,
        of which its full blocks' chained `block_hashes` (optional) are shared with other
        requests there. `prefill_only` (a prefill-pool worker): the entry ends at the first
        token."""
        wl = self._workers.get(worker_id)
        if wl is None:
            return
        if request_id in wl.entries:
            raise ValueError(f"request {request_id!r} is already routed to {worker_id!r}")
        now = self._clock()
        hashes = tuple(block_hashes[:blocks])
        entry = _Entry(worker_id, prefill_tokens, blocks - len(hashes), hashes, prefill_only, now)
        wl.entries[request_id] = entry
        wl.prefill_tokens += prefill_tokens
        wl.blocks += entry.private
        shared = wl.shared
        for h in hashes:
            n = shared.get(h, 0)
            if not n:
                wl.blocks += 1
            shared[h] = n + 1
        wl.waiting += 1
        self._requests.setdefault(request_id, []).append(entry)
        self._maybe_gc(now)

    def on_first_token(self, request_id: str) -> None:
        for entry in list(self._requests.get(request_id, ())):
            wl = self._workers.get(entry.worker_id)
            if wl is None:
                continue
            if entry.prefill_only:
                self._drop_entry(request_id, entry, wl)
            elif entry.waiting:
                entry.waiting = False
                wl.waiting -= 1
                wl.prefill_tokens -= entry.prefill_tokens
                entry.prefill_tokens = 0

    def on_finished(self, request_id: str) -> None:
        for entry in list(self._requests.get(request_id, ())):
            wl = self._workers.get(entry.worker_id)
            if wl is not None:
                self._drop_entry(request_id, entry, wl)
        self._requests.pop(request_id, None)

    def _drop_entry(self, request_id: str, entry: _Entry, wl: _WorkerLoad) -> None:
        if wl.entries.pop(request_id, None) is not entry:
            return
        wl.prefill_tokens -= entry.prefill_tokens
        wl.blocks -= entry.private
        shared = wl.shared
        for h in entry.hashes:
            n = shared[h] - 1
            if n:
                shared[h] = n
            else:
                del shared[h]
                wl.blocks -= 1
        if entry.waiting:
            wl.waiting -= 1
        entries = self._requests.get(request_id)
        if entries is not None:
            entries.remove(entry)
            if not entries:
                del self._requests[request_id]

    def _maybe_gc(self, now: float) -> None:
        if now < self._next_gc:
            return
        self._next_gc = now + min(self._timeout_s, 60.0)
        cutoff = now - self._timeout_s
        for wl in self._workers.values():
            for rid, entry in list(wl.entries.items()):
                if entry.t < cutoff:
                    self._drop_entry(rid, entry, wl)

    # -- views --------------------------------------------------------------------------------
    def view(self, worker_id: str, now: float | None = None) -> LoadView:
        """The worker's load; `now` (the tracker's clock) may be passed to save a call."""
        wl = self._workers[worker_id]
        blocks, waiting = wl.blocks, wl.waiting
        if (self._clock() if now is None else now) - wl.stats_t <= self._stats_ttl_s:
            blocks = max(blocks, wl.reported_used)
            waiting = max(waiting, wl.reported_waiting)
        return LoadView(wl.prefill_tokens, blocks, waiting, wl.total_blocks)

    def eligible(
        self,
        worker_ids: Iterable[str],
        max_active_blocks_frac: float,
        max_queue: int | None,
        exclude: Collection[str] = (),
    ) -> tuple[list[str], list[int], list[int]]:
        """The workers that are not busy (nor excluded), with their prefill tokens in flight
        and active blocks: three parallel lists (the router's hot path: no objects)."""
        now = self._clock()
        ttl = self._stats_ttl_s
        workers = self._workers
        ids: list[str] = []
        prefill: list[int] = []
        active: list[int] = []
        for w in worker_ids:
            if exclude and w in exclude:
                continue
            wl = workers[w]
            blocks, waiting = wl.blocks, wl.waiting
            if now - wl.stats_t <= ttl:
                if wl.reported_used > blocks:
                    blocks = wl.reported_used
                if wl.reported_waiting > waiting:
                    waiting = wl.reported_waiting
            total = wl.total_blocks
            if total and blocks > max_active_blocks_frac * total:
                continue
            if max_queue is not None and waiting >= max_queue:
                continue
            ids.append(w)
            prefill.append(wl.prefill_tokens)
            active.append(blocks)
        return ids, prefill, active

    def now(self) -> float:
        return self._clock()

    def num_requests(self) -> int:
        """Routed requests still tracked (tests check this drains to 0)."""
        return len(self._requests)
