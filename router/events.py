"""KV events: what a worker's block pool tells the router, and their msgpack wire format.

Lifecycle on the worker side: the engine's `BlockPool` calls its `event_sink`
(`on_stored`, `on_removed`, `on_cleared`) from the engine thread; a `KvEventPublisher` is that
sink. It numbers and batches the events, and `flush()` (called by the worker after each
engine step or on a short timer) encodes the pending batch and hands the bytes to the
worker's `sink` callback (e.g. a queue feeding the gRPC event stream). `snapshot()` flushes,
then encodes every hash the pool currently holds with the id of the last batch handed out:
a router that loads it and then applies the batches after that id converges on the pool's
state (stored/removed are idempotent, so a pool change racing the snapshot is harmless).

Wire format (msgpack arrays of ints/bytes/str only, no pickle):
    batch:    [1, 0, worker_id, event_id, block_size, [event, ...]]
        stored:   [0, [hash, ...], parent_hash | nil, token_count]
        removed:  [1, [hash, ...]]
        cleared:  [2]
    snapshot: [1, 1, worker_id, event_id, block_size, [hash, ...]]
    hello:    [1, 2, worker_id, 0, block_size, [total_blocks | nil]]      (first stream message)
    stats:    [1, 3, worker_id, 0, block_size, [num_waiting, num_running,
                                                num_free_blocks, num_total_blocks]]
Event ids are per worker, start at 1 and grow by 1 per batch; a snapshot of a pool that has
published nothing yet has event id 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import msgpack

from splitserve.router.errors import EventDecodeError

#: Version of the wire format (first element of every message).
WIRE_VERSION = 1
_KIND_BATCH = 0
_KIND_SNAPSHOT = 1
_KIND_HELLO = 2
_KIND_STATS = 3
_EV_STORED = 0
_EV_REMOVED = 1
_EV_CLEARED = 2


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the worker's prefix cache."""

    #: Chained block hashes (engine.kv_hash), in sequence order.
    block_hashes: tuple[int, ...]
    #: Hash of the block before the first one; None when the first block starts a sequence.
    parent_hash: int | None
    #: Tokens the blocks cover (len(block_hashes) * block_size: only full blocks are hashed).
    token_count: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the worker's prefix cache (evicted)."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """The worker dropped its whole prefix cache."""


KvEvent = Union[BlockStored, BlockRemoved, AllCleared]


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """Events of one worker, numbered: `event_id` is the previous batch's plus one."""

    worker_id: str
    event_id: int
    block_size: int
    events: tuple[KvEvent, ...]


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """Every block hash a worker holds, as of its batch `event_id` (0: before any batch)."""

    worker_id: str
    event_id: int
    block_size: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KvHello:
    """First message of a worker's event stream: who it is and how it hashes."""

    worker_id: str
    block_size: int
    #: Size of its block pool, when known.
    total_blocks: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A worker's load, sent on its event stream (the fields of engine EngineStats)."""

    worker_id: str
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int


KvMessage = Union[KvEventBatch, KvSnapshot, KvHello, WorkerStats]


# -- encoding ------------------------------------------------------------------------------
def _event_to_wire(ev: KvEvent) -> list:
    if type(ev) is BlockStored:
        return [_EV_STORED, ev.block_hashes, ev.parent_hash, ev.token_count]
    if type(ev) is BlockRemoved:
        return [_EV_REMOVED, ev.block_hashes]
    if type(ev) is AllCleared:
        return [_EV_CLEARED]
    raise TypeError(f"not a KV event: {ev!r}")


def encode_batch(batch: KvEventBatch) -> bytes:
    return msgpack.packb(
        [WIRE_VERSION, _KIND_BATCH, batch.worker_id, batch.event_id, batch.block_size,
         [_event_to_wire(ev) for ev in batch.events]],
        use_bin_type=True,
    )


def encode_snapshot(snapshot: KvSnapshot) -> bytes:
    return msgpack.packb(
        [WIRE_VERSION, _KIND_SNAPSHOT, snapshot.worker_id, snapshot.event_id,
         snapshot.block_size, snapshot.block_hashes],
        use_bin_type=True,
    )


def encode_hello(hello: KvHello) -> bytes:
    return msgpack.packb(
        [WIRE_VERSION, _KIND_HELLO, hello.worker_id, 0, hello.block_size, [hello.total_blocks]],
        use_bin_type=True,
    )


def encode_stats(stats: WorkerStats, block_size: int) -> bytes:
    return msgpack.packb(
        [WIRE_VERSION, _KIND_STATS, stats.worker_id, 0, block_size,
         [stats.num_waiting, stats.num_running, stats.num_free_blocks, stats.num_total_blocks]],
        use_bin_type=True,
    )


# -- decoding ------------------------------------------------------------------------------
def _event_from_wire(raw: Sequence) -> KvEvent:
    tag = raw[0]
    if tag == _EV_STORED:
        _, hashes, parent, token_count = raw
        return BlockStored(tuple(hashes), parent, int(token_count))
    if tag == _EV_REMOVED:
        return BlockRemoved(tuple(raw[1]))
    if tag == _EV_CLEARED:
        return AllCleared()
    raise EventDecodeError(f"unknown KV event tag {tag!r}")


def decode_message(data: bytes) -> KvMessage:
    """Decode one wire message (a batch, a snapshot, a hello or stats)."""
    try:
        msg = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
        version, kind, worker_id, event_id, block_size, payload = msg
    except EventDecodeError:
        raise
    except Exception as exc:  # msgpack errors, wrong shape
        raise EventDecodeError(f"malformed KV event message: {exc}") from exc
    if version != WIRE_VERSION:
        raise EventDecodeError(f"KV event wire version {version!r}, expected {WIRE_VERSION}")
    if not isinstance(event_id, int) or not isinstance(block_size, int):
        raise EventDecodeError("event_id and block_size must be integers")
    if kind == _KIND_BATCH:
        try:
            events = tuple(_event_from_wire(ev) for ev in payload)
        except EventDecodeError:
            raise
        except Exception as exc:
            raise EventDecodeError(f"malformed KV event: {exc}") from exc
        return KvEventBatch(worker_id, event_id, block_size, events)
    if kind == _KIND_SNAPSHOT:
        return KvSnapshot(worker_id, event_id, block_size, tuple(payload))
    try:
        if kind == _KIND_HELLO:
            (total,) = payload
            return KvHello(worker_id, block_size, total)
        if kind == _KIND_STATS:
            waiting, running, free, total = (int(x) for x in payload)
            return WorkerStats(worker_id, waiting, running, free, total)
    except Exception as exc:
        raise EventDecodeError(f"malformed KV message payload: {exc}") from exc
    raise EventDecodeError(f"unknown KV message kind {kind!r}")


def decode_batch(data: bytes) -> KvEventBatch:
    msg = decode_message(data)
    if not isinstance(msg, KvEventBatch):
        raise EventDecodeError(f"expected a KV event batch, got {type(msg).__name__}")
    return msg


def decode_snapshot(data: bytes) -> KvSnapshot:
    msg = decode_message(data)
    if not isinstance(msg, KvSnapshot):
        raise EventDecodeError(f"expected a KV snapshot, got {type(msg).__name__}")
    return msg


# -- publisher (worker side) ---------------------------------------------------------------
class KvEventPublisher:
    """The `event_sink` of an engine's BlockPool: numbers, batches and encodes its events.

    Thread-safe: the pool calls `on_*` from the engine thread while the worker's service
    calls `flush()` / `snapshot()` from its event loop. `sink(data)` is called with the
    publisher's lock held, in event-id order: keep it cheap (a queue put,
    `loop.call_soon_threadsafe`). A batch is flushed on its own once it holds
    `max_batch_blocks` block hashes or `max_batch_events` events; otherwise the owner calls
    `flush()` after each engine step or on a short timer.
    """

    def __init__(
        self,
        worker_id: str,
        block_size: int,
        sink: Callable[[bytes], None],
        *,
        snapshot_source: Callable[[], Iterable[int]] | None = None,
        max_batch_events: int = 256,
        max_batch_blocks: int = 8192,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_batch_events < 1 or max_batch_blocks < 1:
            raise ValueError("max_batch_events and max_batch_blocks must be >= 1")
        self.worker_id = worker_id
        self.block_size = block_size
        self._sink = sink
        self._snapshot_source = snapshot_source
        self._max_events = max_batch_events
        self._max_blocks = max_batch_blocks
        self._lock = threading.RLock()
        self._pending: list[KvEvent] = []
        self._pending_blocks = 0
        self._last_event_id = 0

    @property
    def last_event_id(self) -> int:
        """Id of the last batch handed to the sink (0 before the first)."""
        return self._last_event_id

    def set_snapshot_source(self, source: Callable[[], Iterable[int]]) -> None:
        """`source()` returns a copy of every hash the pool holds (e.g. pool.cached_hashes)."""
        self._snapshot_source = source

    # -- the BlockPool's event_sink protocol --------------------------------------------------
    def on_stored(self, block_hashes: Sequence[int], parent_hash: int | None) -> None:
        if not block_hashes:
            return
        hashes = tuple(block_hashes)
        self._add(BlockStored(hashes, parent_hash, len(hashes) * self.block_size), len(hashes))

    def on_removed(self, block_hashes: Sequence[int]) -> None:
        if not block_hashes:
            return
        hashes = tuple(block_hashes)
        self._add(BlockRemoved(hashes), len(hashes))

    def on_cleared(self) -> None:
        with self._lock:
            # Everything pending before a clear is moot.
            self._pending.clear()
            self._pending_blocks = 0
            self._add(AllCleared(), 0)

    # -- owner side ---------------------------------------------------------------------------
    def _add(self, ev: KvEvent, n_blocks: int) -> None:
        with self._lock:
            self._pending.append(ev)
            self._pending_blocks += n_blocks
            if len(self._pending) >= self._max_events or self._pending_blocks >= self._max_blocks:
                self._flush_locked()

    def _flush_locked(self) -> int | None:
        if not self._pending:
            return None
        self._last_event_id += 1
        batch = KvEventBatch(
            self.worker_id, self._last_event_id, self.block_size, tuple(self._pending)
        )
        self._pending = []
        self._pending_blocks = 0
        self._sink(encode_batch(batch))
        return batch.event_id

    def flush(self) -> int | None:
        """Hand the pending events to the sink as one batch; its event id, or None if none."""
        with self._lock:
            return self._flush_locked()

    def snapshot(self) -> bytes:
        """Encoded KvSnapshot of the pool, consistent with the batches handed out so far."""
        with self._lock:
            if self._snapshot_source is None:
                raise RuntimeError("KvEventPublisher has no snapshot_source")
            self._flush_locked()
            hashes = tuple(self._snapshot_source())
            return encode_snapshot(
                KvSnapshot(self.worker_id, self._last_event_id, self.block_size, hashes)
            )
