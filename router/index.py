"""The global KV index: which workers hold which chained block hashes.

Chained hashes make a flat map enough (a block's hash covers its whole prefix): each hash
maps to an int bitmask of worker slots, each worker keeps the set of hashes it holds. Memory
is therefore bounded by the union of what the workers hold, and a leaving worker is dropped
in time proportional to its own blocks. `find_matches` walks a prompt's hashes in order and
ANDs the masks: a worker's score is the number of leading blocks it holds.

Lifecycle of a worker entry: `add_worker` (block size checked: a mismatch is an error here,
never a silent miss) → batches applied in event-id order (`apply`) → on an id gap the entry
is *stale*: `apply` raises `EventGap` once, buffers later batches, and the caller fetches the
worker's snapshot for `load_snapshot`, which replaces the entry and replays the buffer →
`remove_worker` drops everything it held. A worker that publishes no events is added with
`approximate=True`: the router records its own routing decisions (`record_routed`), which
expire after a TTL.

Not thread-safe: use one index from one thread (the router's event loop).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from splitserve.engine.kv_hash import ROOT_HASH, hash_token_blocks
from splitserve.router.errors import BlockSizeMismatch, EventGap, UnknownWorker
from splitserve.router.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvSnapshot,
)

logger = logging.getLogger(__name__)


class ApplyResult(enum.Enum):
    """What `KvIndex.apply` did with a batch (a gap raises `EventGap` instead)."""

    APPLIED = "applied"
    #: Event id already seen (a retransmission, or covered by a snapshot): ignored.
    DUPLICATE = "duplicate"
    #: The worker is stale (waiting for its snapshot): kept for replay.
    BUFFERED = "buffered"
    #: Unknown or approximate worker (e.g. a batch in flight when it was removed): ignored.
    IGNORED = "ignored"


class _Worker:
    __slots__ = (
        "worker_id", "slot", "bit", "held", "approximate", "capacity",
        "last_event_id", "stale", "pending",
    )

    def __init__(self, worker_id: str, slot: int, approximate: bool, capacity: int) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.bit = 1 << slot
        self.approximate = approximate
        self.capacity = capacity
        # Event workers: set of hashes. Approximate workers: hash -> expiry, oldest first.
        self.held: set[int] | OrderedDict[int, float] = OrderedDict() if approximate else set()
        self.last_event_id = 0
        self.stale = False
        self.pending: list[KvEventBatch] = []


class KvIndex:
    """Chained block hash -> workers holding it; see the module docstring."""

    def __init__(
        self,
        block_size: int,
        *,
        resync_buffer_batches: int = 1024,
        approx_ttl_s: float = 120.0,
        approx_max_blocks: int = 1 << 18,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._resync_buffer = resync_buffer_batches
        self._approx_ttl_s = approx_ttl_s
        self._approx_max_blocks = approx_max_blocks
        self._clock = clock
        self._masks: dict[int, int] = {}
        self._workers: dict[str, _Worker] = {}
        self._slot_worker: list[str | None] = []
        self._free_slots: list[int] = []
        self._approx: list[_Worker] = []

    # -- membership ---------------------------------------------------------------------------
    def add_worker(
        self,
        worker_id: str,
        block_size: int,
        *,
        approximate: bool = False,
        capacity: int | None = None,
    ) -> None:
        """Subscribe a worker. Raises BlockSizeMismatch when its block size differs.

        A new entry expects event id 1 next; a worker that has published before is resynced
        through the EventGap its first batch raises. `capacity` (its pool size in blocks)
        bounds what approximate mode remembers for it.
        """
        if block_size != self.block_size:
            raise BlockSizeMismatch(worker_id, self.block_size, block_size)
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already in the index")
        if self._free_slots:
            slot = self._free_slots.pop()
            self._slot_worker[slot] = worker_id
        else:
            slot = len(self._slot_worker)
            self._slot_worker.append(worker_id)
        cap = min(capacity, self._approx_max_blocks) if capacity else self._approx_max_blocks
        w = _Worker(worker_id, slot, approximate, cap)
        self._workers[worker_id] = w
        if approximate:
            self._approx.append(w)

    def remove_worker(self, worker_id: str) -> int:
        """Drop a worker and everything it held; returns how many blocks it held."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return 0
        n = len(w.held)
        self._clear(w)
        if w.approximate:
            self._approx.remove(w)
        self._slot_worker[w.slot] = None
        self._free_slots.append(w.slot)
        return n

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def workers(self) -> list[str]:
        return list(self._workers)

    # -- primitives ---------------------------------------------------------------------------
    def _store(self, w: _Worker, hashes: Iterable[int]) -> None:
        masks = self._masks
        held = w.held
        bit = w.bit
        for h in hashes:
            if h not in held:
                held.add(h)  # type: ignore[union-attr]
                masks[h] = masks.get(h, 0) | bit

    def _remove(self, w: _Worker, hashes: Iterable[int]) -> None:
        masks = self._masks
        held = w.held
        clear = ~w.bit
        for h in hashes:
            if h in held:
                held.discard(h)  # type: ignore[union-attr]
                m = masks[h] & clear
                if m:
                    masks[h] = m
                else:
                    del masks[h]

    def _clear(self, w: _Worker) -> None:
        masks = self._masks
        clear = ~w.bit
        for h in w.held:
            m = masks[h] & clear
            if m:
                masks[h] = m
            else:
                del masks[h]
        w.held.clear()

    def _apply_events(self, w: _Worker, batch: KvEventBatch) -> None:
        for ev in batch.events:
            t = type(ev)
            if t is BlockStored:
                self._store(w, ev.block_hashes)
            elif t is BlockRemoved:
                self._remove(w, ev.block_hashes)
            elif t is AllCleared:
                self._clear(w)
            else:
                raise TypeError(f"not a KV event: {ev!r}")
        w.last_event_id = batch.event_id

    # -- events -------------------------------------------------------------------------------
    def apply(self, batch: KvEventBatch) -> ApplyResult:
        """Apply one batch in event-id order. Raises EventGap when ids skip (resync needed)."""
        w = self._workers.get(batch.worker_id)
        if w is None or w.approximate:
            logger.debug("ignoring KV events of %r (not subscribed)", batch.worker_id)
            return ApplyResult.IGNORED
        if batch.block_size != self.block_size:
            raise BlockSizeMismatch(batch.worker_id, self.block_size, batch.block_size)
        if w.stale:
            self._buffer(w, batch)
            return ApplyResult.BUFFERED
        if batch.event_id <= w.last_event_id:
            return ApplyResult.DUPLICATE
        if batch.event_id != w.last_event_id + 1:
            w.stale = True
            self._buffer(w, batch)
            raise EventGap(batch.worker_id, w.last_event_id + 1, batch.event_id)
        self._apply_events(w, batch)
        return ApplyResult.APPLIED

    def _buffer(self, w: _Worker, batch: KvEventBatch) -> None:
        if self._resync_buffer == 0:
            return
        w.pending.append(batch)
        if len(w.pending) > self._resync_buffer:
            del w.pending[0]

    def load_snapshot(
        self,
        worker_id: str,
        block_hashes: Iterable[int],
        event_id: int,
        *,
        block_size: int | None = None,
    ) -> int:
        """Replace a worker's entry with its snapshot (as of `event_id`), then replay the
        batches buffered since. Returns how many buffered batches were applied. Raises
        EventGap if the buffer still misses ids after the snapshot (ask for a newer one)."""
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        if block_size is not None and block_size != self.block_size:
            raise BlockSizeMismatch(worker_id, self.block_size, block_size)
        if w.approximate:
            raise ValueError(f"worker {worker_id!r} is approximate: it has no snapshot")
        self._clear(w)
        self._store(w, block_hashes)
        w.last_event_id = event_id
        w.stale = False
        pending = sorted(w.pending, key=lambda b: b.event_id)
        w.pending = []
        replayed = 0
        for i, batch in enumerate(pending):
            if batch.event_id <= w.last_event_id:
                continue
            if batch.event_id != w.last_event_id + 1:
                w.stale = True
                w.pending = pending[i:]
                raise EventGap(worker_id, w.last_event_id + 1, batch.event_id)
            self._apply_events(w, batch)
            replayed += 1
        return replayed

    def load_snapshot_message(self, snapshot: KvSnapshot) -> int:
        return self.load_snapshot(
            snapshot.worker_id, snapshot.block_hashes, snapshot.event_id,
            block_size=snapshot.block_size,
        )

    def is_stale(self, worker_id: str) -> bool:
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        return w.stale

    def stale_workers(self) -> list[str]:
        return [w.worker_id for w in self._workers.values() if w.stale]

    def last_event_id(self, worker_id: str) -> int:
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        return w.last_event_id

    # -- approximate mode ---------------------------------------------------------------------
    def is_approximate(self, worker_id: str) -> bool:
        w = self._workers.get(worker_id)
        return w is not None and w.approximate

    def record_routed(self, worker_id: str, block_hashes: Sequence[int]) -> bool:
        """Approximate workers: remember that `worker_id` will hold these blocks for the TTL.
        A no-op (False) for workers that publish events."""
        w = self._workers.get(worker_id)
        if w is None or not w.approximate:
            return False
        expiry = self._clock() + self._approx_ttl_s
        held: OrderedDict[int, float] = w.held  # type: ignore[assignment]
        masks = self._masks
        bit = w.bit
        for h in block_hashes:
            if h in held:
                held.move_to_end(h)
            else:
                masks[h] = masks.get(h, 0) | bit
            held[h] = expiry
        clear = ~bit
        while len(held) > w.capacity:
            h, _ = held.popitem(last=False)
            m = masks[h] & clear
            if m:
                masks[h] = m
            else:
                del masks[h]
        return True

    def expire(self, now: float | None = None) -> int:
        """Forget approximate entries whose TTL has passed; returns how many."""
        if not self._approx:
            return 0
        if now is None:
            now = self._clock()
        masks = self._masks
        n = 0
        for w in self._approx:
            held: OrderedDict[int, float] = w.held  # type: ignore[assignment]
            clear = ~w.bit
            while held:
                h, expiry = next(iter(held.items()))
                if expiry > now:
                    break
                del held[h]
                m = masks[h] & clear
                if m:
                    masks[h] = m
                else:
                    del masks[h]
                n += 1
        return n

    # -- queries ------------------------------------------------------------------------------
    def hash_tokens(self, token_ids: Sequence[int]) -> list[int]:
        return hash_token_blocks(token_ids, self.block_size)

    def find_matches(self, token_ids: Sequence[int]) -> dict[str, int]:
        """{worker: number of leading blocks of the prompt it holds}, workers with >= 1.

        Hashes lazily, in growing chunks, and stops as soon as no worker holds the prefix so
        far: a prompt that diverges early costs a few block hashes, not the whole prompt."""
        bs = self.block_size
        n_full = len(token_ids) // bs
        result: dict[str, int] = {}
        masks = self._masks
        if n_full == 0 or not masks:
            return result
        i = 0
        chunk = 4
        active = 0
        parent = ROOT_HASH
        while i < n_full:
            end = min(n_full, i + chunk)
            hashes = hash_token_blocks(token_ids[i * bs : end * bs], bs, parent)
            parent = hashes[-1]
            for h in hashes:
                m = masks.get(h, 0)
                if i == 0:
                    active = m
                else:
                    dropped = active & ~m
                    if dropped:
                        self._credit(dropped, i, result)
                        active &= m
                if not active:
                    return result
                i += 1
            chunk = min(chunk * 2, 64)
        self._credit(active, i, result)
        return result

    def find_matches_for_hashes(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Same as find_matches, from the prompt's chained block hashes."""
        result: dict[str, int] = {}
        if not block_hashes:
            return result
        masks = self._masks
        it = iter(block_hashes)
        active = masks.get(next(it), 0)
        if not active:
            return result
        i = 1
        for h in it:
            m = masks.get(h, 0)
            dropped = active & ~m
            if dropped:
                self._credit(dropped, i, result)
                active &= m
                if not active:
                    return result
            i += 1
        self._credit(active, i, result)
        return result

    def _credit(self, bits: int, score: int, result: dict[str, int]) -> None:
        slot_worker = self._slot_worker
        while bits:
            low = bits & -bits
            result[slot_worker[low.bit_length() - 1]] = score  # type: ignore[index]
            bits ^= low

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes indexed (the union of what the workers hold)."""
        return len(self._masks)

    def num_worker_blocks(self, worker_id: str) -> int:
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        return len(w.held)

    def holds(self, worker_id: str, block_hash: int) -> bool:
        w = self._workers.get(worker_id)
        return w is not None and block_hash in w.held

    def workers_holding(self, block_hash: int) -> set[str]:
        bits = self._masks.get(block_hash, 0)
        out: set[str] = set()
        while bits:
            low = bits & -bits
            out.add(self._slot_worker[low.bit_length() - 1])  # type: ignore[arg-type]
            bits ^= low
        return out
