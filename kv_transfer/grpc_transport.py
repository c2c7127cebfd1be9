"""KV transport over gRPC, for machines without NIXL: the serve side streams block bytes.

Lifecycle of one worker's transport:
  1. start(): start a tiny grpc.aio server on `host:0` (an ephemeral port) with one generic
     method, `/splitserve.KvBlocks/Read` (raw bytes, no protobuf). Its address goes into the
     metadata.
  2. add_peer(metadata): open a channel to the peer's server once; cached per peer.
  3. pull(): one server-streaming call per request. The request (msgpack) carries the remote
     block ids, the puller's name and `notify_msg`; the server answers with messages of whole
     blocks (up to `grpc_chunk_bytes`), copied out of its pool in the requested order, and the
     puller copies each message into its local blocks. Deadline → KvTransferTimeout; any other
     status → KvTransferError; cancelling the pull cancels the call.
  4. Once the server has handed the last message to gRPC its blocks are no longer needed (the
     bytes were copied out), so it queues the 'pulled' notice itself: notifications() yields it.
     A call that fails or is cancelled before its end queues no notice.
  5. close(): close channels, stop the server (in-flight calls are cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from .base import Notification, PoolLayout, pack_metadata, pull_indices, unpack_metadata
from .config import KvTransferConfig
from .errors import KvTransferError, KvTransferTimeout

if TYPE_CHECKING:
    import grpc
    import torch

logger = logging.getLogger(__name__)

_SERVICE = "splitserve.KvBlocks"
_READ = f"/{_SERVICE}/Read"
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


def _byte_view(kv_cache: torch.Tensor, layout: PoolLayout) -> torch.Tensor:
    """The pool as uint8 [num_blocks, block_bytes] (a view, no copy)."""
    import torch

    return kv_cache.view(-1).view(torch.uint8).view(layout.num_blocks, layout.block_bytes)


class _Peer:
    __slots__ = ("name", "metadata", "layout", "channel", "read")

    def __init__(self, name: str, metadata: bytes, layout: PoolLayout, channel: Any, read: Any) -> None:
        self.name = name
        self.metadata = metadata
        self.layout = layout
        self.channel = channel
        self.read = read


class GrpcTransport:
    """KvTransport over a grpc.aio block server; see the module docstring for the lifecycle."""

    kind = "grpc"

    def __init__(self, name: str, kv_cache: torch.Tensor, config: KvTransferConfig | None = None) -> None:
        self.config = config or KvTransferConfig()
        self.name = name
        self.layout = PoolLayout.of(kv_cache)
        self._kv_cache = kv_cache
        self._pool = _byte_view(kv_cache, self.layout)
        self._pool_np = self._pool.numpy() if self.layout.device_type == "cpu" else None
        self._blocks_per_msg = max(1, self.config.grpc_chunk_bytes // self.layout.block_bytes)
        self._peers: dict[str, _Peer] = {}
        self._notices: asyncio.Queue[Notification | None] = asyncio.Queue()
        self._server: grpc.aio.Server | None = None
        self._address: str | None = None
        self._metadata: bytes | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the block server (an ephemeral port on config.host)."""
        import grpc

        if self._server is not None:
            return
        server = grpc.aio.server(options=_CHANNEL_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {"Read": grpc.unary_stream_rpc_method_handler(self._serve_read)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{self.config.host}:0")
        if not port:
            raise KvTransferError(f"could not bind the KV block server on {self.config.host}")
        await server.start()
        self._server = server
        self._address = f"{self.config.advertise_host or self.config.host}:{port}"
        self._metadata = pack_metadata(self.kind, self.name, self.layout, address=self._address)
        logger.debug("KV block server %s listening on %s", self.name, self._address)

    # -- peers ---------------------------------------------------------------------------------
    def local_metadata(self) -> bytes:
        if self._metadata is None:
            raise KvTransferError(f"KV transport {self.name!r} is not started")
        return self._metadata

    async def add_peer(self, metadata: bytes) -> str:
        import grpc

        self._check_open()
        md = unpack_metadata(metadata, self.kind)
        name, layout = md["name"], md["pool"]
        known = self._peers.get(name)
        if known is not None:
            if known.metadata == metadata:
                return name
            logger.info("KV peer %s changed its metadata (restarted?); reloading it", name)
            await self.remove_peer(name)
        self.layout.check_compatible(layout, name)
        channel = grpc.aio.insecure_channel(str(md["address"]), options=_CHANNEL_OPTIONS)
        read = channel.unary_stream(_READ)  # no (de)serializers: raw bytes both ways
        self._peers[name] = _Peer(name, metadata, layout, channel, read)
        logger.info("KV peer %s added (grpc %s, %d blocks)", name, md["address"], layout.num_blocks)
        return name

    async def remove_peer(self, peer: str) -> None:
        p = self._peers.pop(peer, None)
        if p is not None:
            await p.channel.close()

    # -- pull ----------------------------------------------------------------------------------
    async def pull(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes = b"",
        timeout_s: float | None = None,
    ) -> None:
        import grpc
        import torch

        self._check_open()
        p = self._peers.get(peer)
        if p is None:
            raise KvTransferError(f"unknown KV peer {peer!r}; add_peer() its metadata first", peer=peer)
        remote_idx, local_idx = pull_indices(peer, p.layout, self.layout, remote_block_ids,
                                             local_block_ids)
        timeout = self.config.timeout_s if timeout_s is None else float(timeout_s)
        request = msgpack.packb(
            {"ids": remote_idx.tobytes(), "peer": self.name, "notify": bytes(notify_msg)}, use_bin_type=True
        )
        local_t = torch.from_numpy(local_idx.astype(np.int64))
        bb = self.layout.block_bytes
        call = p.read(request, timeout=timeout)
        done = 0
        try:
            async for chunk in call:
                n = len(chunk) // bb
                if n * bb != len(chunk) or done + n > local_idx.size:
                    raise KvTransferError(f"peer {peer!r} sent {len(chunk)} B, not whole requested blocks", peer=peer)
                self._scatter(chunk, local_idx[done:done + n], local_t[done:done + n])
                done += n
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise KvTransferTimeout(
                    f"KV pull of {local_idx.size} blocks from {peer!r} timed out after {timeout:.3g} s", peer=peer
                ) from exc
            raise KvTransferError(
                f"KV pull from {peer!r} failed: {exc.code().name}: {exc.details()}", peer=peer
            ) from exc
        finally:
            if not call.done():
                call.cancel()
        if done != local_idx.size:
            raise KvTransferError(f"peer {peer!r} sent {done} of {local_idx.size} blocks", peer=peer)

    def _scatter(self, chunk: bytes, ids: np.ndarray, ids_t: torch.Tensor) -> None:
        """Copy whole blocks `chunk` into local blocks `ids` (plain memcpy on CPU: no OpenMP)."""
        import torch

        n, bb = int(ids.size), self.layout.block_bytes
        if self._pool_np is not None:
            src = np.frombuffer(chunk, dtype=np.uint8).reshape(n, bb)
            for k, i in enumerate(ids.tolist()):
                self._pool_np[i] = src[k]
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
            src_t = torch.frombuffer(chunk, dtype=torch.uint8).view(n, bb)
        self._pool.index_copy_(0, ids_t.to(self._pool.device), src_t.to(self._pool.device))

    # -- serve side ----------------------------------------------------------------------------
    async def _serve_read(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        import grpc

        try:
            req = msgpack.unpackb(request, raw=False)
            ids = np.frombuffer(req["ids"], dtype=np.int32)
            peer, notify = str(req["peer"]), bytes(req["notify"])
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed KV read request: {exc}")
            return
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_blocks):
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"block ids outside [0, {self.layout.num_blocks})"
            )
            return
        step = self._blocks_per_msg
        for start in range(0, ids.size, step):
            yield self._gather(ids[start:start + step])
        if notify:
            self._notices.put_nowait(Notification(peer, notify))

    def _gather(self, ids: np.ndarray) -> bytes:
        """Bytes of blocks `ids`, in order (one copy on CPU)."""
        first, n = int(ids[0]), int(ids.size)
        if self._pool_np is not None:
            if int(ids[-1]) - first == n - 1 and np.all(np.diff(ids) == 1):
                return self._pool_np[first:first + n].tobytes()
            return b"".join([self._pool_np[i].data for i in ids.tolist()])
        import torch

        return self._pool.index_select(0, torch.from_numpy(ids.astype(np.int64)).to(self._pool.device)).cpu().numpy().tobytes()

    def wake(self) -> None:
        """Nothing to do: notices arrive with a pull's last request, nothing is polled."""

    async def notifications(self, expecting: Callable[[], bool] | None = None) -> AsyncIterator[Notification]:
        # notices arrive with the pull's last request; nothing to poll
        while not self._closed:
            note = await self._notices.get()
            if note is None:
                return
            yield note

    # -- teardown ------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in list(self._peers):
            await self.remove_peer(name)
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        self._notices.put_nowait(None)  # ends a waiting notifications() consumer

    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError(f"KV transport {self.name!r} is closed")

    def __repr__(self) -> str:
        return f"GrpcTransport(name={self.name!r}, address={self._address!r}, peers={len(self._peers)})"
