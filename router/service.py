"""The event plane over gRPC: a worker serves its KV events, routers subscribe.

Generic grpc.aio methods carrying msgpack bytes (router/events.py), no protobuf:
    /splitserve.router.KvEvents/Subscribe  unary → stream   request [1, router_block_size]
    /splitserve.router.KvEvents/Snapshot   unary → unary    request b"" → KvSnapshot

Worker side, `KvEventServer`: its `publisher` is the engine BlockPool's `event_sink`;
`attach(server)` adds the methods to the worker's grpc.aio server, `start()` runs the
flush timer (pending events go out every `flush_interval_s`) and the stats timer. A
subscriber whose block size differs is refused at once (FAILED_PRECONDITION). Each
subscriber has a bounded queue; when a slow router lets it fill, what it has not read is
dropped and replaced by a snapshot (in the stream), for that router only.

Router side, `KvEventSubscriber`: connect → Subscribe → the hello names the worker and its
block size (`Router.add_worker`: a mismatch is an error, not retried) → Snapshot →
`load_snapshot` → apply every batch (and any in-stream snapshot), resyncing from a new
snapshot on an event-id gap, and feed the stats messages to `Router.update_stats` → when the
stream breaks, `remove_worker` and reconnect with backoff. `stop()` ends it and removes the
worker. Fatal, not retried (the task ends with it, `error` keeps it): a block-size mismatch,
and `KvEventsUnsupported` (the worker's server has no KvEvents methods: UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from splitserve.router.errors import (
    BlockSizeMismatch,
    EventDecodeError,
    EventGap,
    KvEventsUnsupported,
)
from splitserve.router.events import (
    WIRE_VERSION,
    KvEventBatch,
    KvEventPublisher,
    KvHello,
    KvSnapshot,
    WorkerStats,
    decode_message,
    decode_snapshot,
    encode_hello,
    encode_stats,
)
from splitserve.runtime.grpc_util import KEEPALIVE_OPTIONS

if TYPE_CHECKING:
    import grpc

    from splitserve.router.router import Router

logger = logging.getLogger(__name__)

SERVICE_NAME = "splitserve.router.KvEvents"
SUBSCRIBE_METHOD = f"/{SERVICE_NAME}/Subscribe"
SNAPSHOT_METHOD = f"/{SERVICE_NAME}/Snapshot"

#: Channel options of the event plane (large snapshots; keepalive to notice dead workers).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    *KEEPALIVE_OPTIONS,
)


def encode_subscribe(router_block_size: int) -> bytes:
    return msgpack.packb([WIRE_VERSION, router_block_size])


class KvEventServer:
    """Worker side of the event plane; see the module docstring."""

    def __init__(
        self,
        worker_id: str,
        block_size: int,
        *,
        snapshot_source: Callable[[], Iterable[int]] | None = None,
        stats_source: Callable[[], Any] | None = None,
        total_blocks: int | None = None,
        flush_interval_s: float = 0.005,
        stats_interval_s: float = 0.5,
        max_queue_batches: int = 4096,
    ) -> None:
        if flush_interval_s <= 0 or stats_interval_s <= 0 or max_queue_batches < 1:
            raise ValueError("intervals must be > 0 and max_queue_batches >= 1")
        self.worker_id = worker_id
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.publisher = KvEventPublisher(
            worker_id, block_size, self._on_batch, snapshot_source=snapshot_source
        )
        self._stats_source = stats_source
        self._flush_interval_s = flush_interval_s
        self._stats_interval_s = stats_interval_s
        self._max_queue = max_queue_batches
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        #: Batches dropped because a subscriber's queue was full (it will resync).
        self.dropped_batches = 0

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, server: "grpc.aio.Server") -> None:
        """Add the KvEvents methods to a grpc.aio server (before it starts)."""
        import grpc

        handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Subscribe": grpc.unary_stream_rpc_method_handler(self._subscribe),
            "Snapshot": grpc.unary_unary_rpc_method_handler(self._snapshot),
        })
        server.add_generic_rpc_handlers((handler,))

    async def start(self) -> None:
        """Start the flush and stats timers on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._flush_loop()))
        if self._stats_source is not None:
            self._tasks.append(asyncio.create_task(self._stats_loop()))

    async def stop(self) -> None:
        """Flush what is pending, end every subscriber's stream, stop the timers."""
        self.publisher.flush()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await asyncio.sleep(0)  # let call_soon_threadsafe deliveries land first
        for q in list(self._subscribers):
            self._put(q, None, force=True)

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    # -- fan-out ------------------------------------------------------------------------------
    def _on_batch(self, data: bytes) -> None:
        # Called by the publisher, under its lock, from any thread: hop onto the loop.
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nobody can be subscribed before start()
        loop.call_soon_threadsafe(self._fanout, data)

    def _fanout(self, data: bytes) -> None:
        for q in list(self._subscribers):
            self._put(q, data)

    def _put(self, q: asyncio.Queue, item: bytes | None, force: bool = False) -> None:
        if not q.full():
            q.put_nowait(item)
            return
        if force:  # the end-of-stream marker always gets in
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
            q.put_nowait(item)
            return
        # A slow router: drop what it has not read and send it a snapshot instead (it covers
        # every batch handed out so far; batches after it follow in order).
        dropped = q.qsize() + 1
        self.dropped_batches += dropped
        while not q.empty():
            q.get_nowait()
        try:
            q.put_nowait(self.publisher.snapshot())
            logger.warning("KV event subscriber of %r lagged: %d messages replaced by a "
                           "snapshot", self.worker_id, dropped)
        except RuntimeError:  # no snapshot source: end its stream, it will resubscribe
            q.put_nowait(None)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            self.publisher.flush()

    async def _stats_loop(self) -> None:
        assert self._stats_source is not None
        while True:
            try:
                s = self._stats_source()
                data = encode_stats(
                    WorkerStats(self.worker_id, s.num_waiting, s.num_running,
                                s.num_free_blocks, s.num_total_blocks),
                    self.block_size,
                )
                # Through the same ordered path as batches (after pending deliveries).
                for q in self._subscribers:
                    self._put(q, data)
            except Exception:
                logger.exception("stats source failed")
            await asyncio.sleep(self._stats_interval_s)

    # -- methods ------------------------------------------------------------------------------
    async def _subscribe(self, request: bytes, context: "grpc.aio.ServicerContext"
                         ) -> AsyncIterator[bytes]:
        import grpc

        try:
            version, router_block_size = msgpack.unpackb(request)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed Subscribe request")
            return
        if version != WIRE_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV event wire version {version}, worker speaks {WIRE_VERSION}")
            return
        hello = encode_hello(KvHello(self.worker_id, self.block_size, self.total_blocks))
        if router_block_size != self.block_size:
            # The hello tells the router our block size (its add_worker raises); then refuse.
            logger.error("router subscribed with block size %s, worker %r uses %s",
                         router_block_size, self.worker_id, self.block_size)
            yield hello
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"block size mismatch: worker {self.worker_id!r} uses {self.block_size}, "
                f"router uses {router_block_size}",
            )
            return
        q: asyncio.Queue[bytes | None] = asyncio.Queue(self._max_queue)
        self._subscribers.add(q)
        try:
            yield hello
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            self._subscribers.discard(q)

    async def _snapshot(self, request: bytes, context: "grpc.aio.ServicerContext") -> bytes:
        return self.publisher.snapshot()


class KvEventSubscriber:
    """Router side: keeps one worker in a Router, fed from its event stream."""

    def __init__(
        self,
        router: "Router",
        target: str,
        pool: str = "decode",
        *,
        expected_worker_id: str | None = None,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        max_resync_attempts: int = 5,
    ) -> None:
        self.router = router
        self.target = target
        self.pool = pool
        self.expected_worker_id = expected_worker_id
        self._backoff = backoff_s
        self._max_resync = max_resync_attempts
        self._task: asyncio.Task | None = None
        #: Set once the worker is in the router (snapshot loaded); cleared when it leaves.
        self.ready = asyncio.Event()
        self.worker_id: str | None = None
        #: Resyncs from a snapshot after an event gap (for tests and metrics).
        self.resyncs = 0
        #: The fatal error that stopped the subscriber (e.g. BlockSizeMismatch), if any.
        self.error: BaseException | None = None

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name=f"kv-events:{self.target}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Subscribe, and resubscribe with backoff until cancelled or a fatal error."""
        delay = self._backoff[0]
        while True:
            try:
                await self._run_once()
                delay = self._backoff[0]
            except asyncio.CancelledError:
                raise
            except BlockSizeMismatch as exc:
                self.error = exc
                logger.error("%s: %s; not subscribing", self.target, exc)
                raise
            except KvEventsUnsupported as exc:
                self.error = exc
                logger.info("%s", exc)
                raise
            except Exception as exc:  # connection loss, worker restart, decode error
                logger.warning("KV event stream from %s ended: %s", self.target, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _run_once(self) -> None:
        import grpc

        cfg_bs = self.router.config.block_size
        async with grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS)) as ch:
            subscribe = ch.unary_stream(SUBSCRIBE_METHOD)
            snapshot = ch.unary_unary(SNAPSHOT_METHOD)
            call = subscribe(encode_subscribe(cfg_bs))
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise KvEventsUnsupported(self.target) from None
                raise
            if first is grpc.aio.EOF:
                return
            hello = decode_message(first)
            if not isinstance(hello, KvHello):
                raise EventDecodeError("KV event stream did not start with a hello")
            if self.expected_worker_id is not None and hello.worker_id != self.expected_worker_id:
                raise EventDecodeError(
                    f"{self.target} is worker {hello.worker_id!r}, "
                    f"expected {self.expected_worker_id!r}"
                )
            wid = hello.worker_id
            self.router.add_worker(wid, self.pool, block_size=hello.block_size,
                                   total_blocks=hello.total_blocks)
            self.worker_id = wid
            try:
                await self._resync(snapshot, initial=True)
                self.ready.set()
                while True:
                    data = await call.read()  # (read() and `async for` cannot be mixed)
                    if data is grpc.aio.EOF:
                        return
                    msg = decode_message(data)
                    if isinstance(msg, KvEventBatch):
                        try:
                            self.router.apply_events(msg)
                        except EventGap as gap:
                            logger.info("%s", gap)
                            await self._resync(snapshot)
                    elif isinstance(msg, KvSnapshot):  # sent when we lagged behind
                        try:
                            self.router.load_snapshot(msg)
                            self.resyncs += 1
                        except EventGap:
                            await self._resync(snapshot)
                    elif isinstance(msg, WorkerStats):
                        self.router.update_stats(wid, msg)
            finally:
                self.ready.clear()
                self.router.remove_worker(wid)
                self.worker_id = None
                call.cancel()

    async def _resync(self, snapshot: Any, initial: bool = False) -> None:
        for _ in range(self._max_resync):
            snap = decode_snapshot(await snapshot(b""))
            try:
                self.router.load_snapshot(snap)
                self.resyncs += not initial
                return
            except EventGap as gap:  # batches dropped after the snapshot: take a newer one
                logger.info("%s after snapshot; retrying", gap)
        raise EventGap(self.worker_id or self.target, -1, -1)
