"""Errors of the KV transfer plane."""

from __future__ import annotations


class KvTransferError(RuntimeError):
    """A pull failed (peer gone, transfer error, bad block ids, incompatible pools).

    `peer` names the remote side when known. `handle_released` is False only when the
    transport could not release (cancel) an in-flight transfer: the local blocks of that pull
    may still be written, so the caller must not hand them to another request.
    """

    def __init__(self, message: str, peer: str | None = None, handle_released: bool = True) -> None:
        super().__init__(message)
        self.peer = peer
        self.handle_released = handle_released


class KvTransferTimeout(KvTransferError, TimeoutError):
    """A pull did not complete within its timeout; it was abandoned (handle released)."""


class KvTransportUnavailable(RuntimeError):
    """A transport cannot be built on this machine (package missing, backend not loading)."""
