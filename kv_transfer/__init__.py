"""Moving KV blocks between workers: NIXL (UCX) one-sided READs, or a gRPC fallback.

This package moves whole blocks of one registered pool; it knows nothing of requests or
tokens. The pool is one contiguous tensor `kv_cache[num_blocks, ...]` (docs/contracts.md);
block i is the byte range [i * block_bytes, (i + 1) * block_bytes), block_bytes =
kv_cache[0].nbytes.

Lifecycle (both workers run the same calls from their event loop):

    t = await create_transport("auto" | "nixl" | "grpc", name, kv_cache, KvTransferConfig())
        # registers the whole pool once (NIXL) or starts the block server (gRPC)
    md = t.local_metadata()                 # publish once (discovery / KV handle / gRPC call)

    # decode worker (puller), per prefill peer, once:
    peer = await t.add_peer(prefill_md)     # cached; a changed md (restart) reloads the peer
    # per request:
    await t.pull(peer, remote_block_ids, local_block_ids, notify_msg=b"req-42", timeout_s=5)
        # READ the peer's blocks into ours pairwise (contiguous runs merge into one
        # descriptor), wait without blocking the loop, release the transfer handle, then send
        # notify_msg to the peer. Raises KvTransferTimeout / KvTransferError (handle released
        # either way; exc.handle_released is False only if NIXL refused to cancel, in which
        # case the local blocks must not be reused). No notice is sent on failure: the serve
        # side's own timeout frees its blocks.

    # prefill worker (serve side): keep one consumer running for the worker's life. On NIXL
    # it also drives the agent's progress, which the first READ from each new peer (UCX
    # connection wire-up) waits for: without a consumer that pull hangs until its timeout.
    async for note in t.notifications():    # Notification(peer=<puller name>, msg=notify_msg)
        free_pinned_blocks(note.msg)

    await t.remove_peer(peer)               # a peer left
    await t.close()                         # deregister, forget peers, stop the server

Everything of one transport runs on one event loop thread (NIXL agents are created without
thread synchronization). Both kinds must match across workers (the metadata says which).
"""

from __future__ import annotations

from .base import KvTransport, Notification, PoolLayout
from .config import TRANSPORT_KINDS, KvTransferConfig
from .errors import KvTransferError, KvTransferTimeout, KvTransportUnavailable
from .registry import TRANSPORTS, create_transport

__all__ = [
    "KvTransport", "Notification", "PoolLayout", "KvTransferConfig", "TRANSPORT_KINDS",
    "KvTransferError", "KvTransferTimeout", "KvTransportUnavailable", "TRANSPORTS",
    "create_transport",
]
