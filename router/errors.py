"""Errors the router raises; the frontend maps `NoWorkerAvailable` to 503 + Retry-After."""

from __future__ import annotations


class RouterError(Exception):
    """Base of every router error."""


class BlockSizeMismatch(RouterError, ValueError):
    """A worker hashes blocks of another size than the router: its hashes would never match.

    Raised when the worker subscribes (`KvIndex.add_worker`) or when one of its batches or
    snapshots carries another block size; never a silent miss.
    """

    def __init__(self, worker_id: str, router_block_size: int, worker_block_size: int) -> None:
        super().__init__(
            f"worker {worker_id!r} uses block_size {worker_block_size}, "
            f"the router uses {router_block_size}"
        )
        self.worker_id = worker_id
        self.router_block_size = router_block_size
        self.worker_block_size = worker_block_size


class EventGap(RouterError):
    """A worker's event ids skipped ahead: events were lost, its index entry is stale.

    The caller must fetch the worker's snapshot and pass it to `KvIndex.load_snapshot`.
    Batches that arrive meanwhile are buffered by the index and replayed after the snapshot.
    """

    def __init__(self, worker_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"worker {worker_id!r}: expected event id {expected}, got {got}; resync from snapshot"
        )
        self.worker_id = worker_id
        self.expected = expected
        self.got = got


class UnknownWorker(RouterError, KeyError):
    """An operation names a worker the router does not know."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id

    def __str__(self) -> str:
        return f"unknown worker {self.worker_id!r}"


class NoWorkerAvailable(RouterError):
    """Every worker of the pool is busy (or the pool is empty): answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KvEventsUnsupported(RouterError):
    """A worker serves no KV events (its gRPC server lacks the KvEvents methods): route to
    it in approximate mode instead."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target} publishes no KV events")
        self.target = target


class EventDecodeError(RouterError, ValueError):
    """A KV event message is not one this version understands."""
