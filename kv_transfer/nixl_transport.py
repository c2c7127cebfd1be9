"""KV transport over NIXL (UCX backend): one-sided READs of registered pool memory.

Lifecycle of one worker's transport:
  1. __init__: on the transport's own thread, create the NIXL agent (UCX, no progress
     thread), register the whole pool once, and prepare a local descriptor list with one
     descriptor per block.
  2. add_peer(metadata): load the peer's agent metadata (its registration keys) once and
     prepare a remote descriptor list over all of the peer's blocks; cached per peer.
  3. pull(): per request, `make_prepped_xfer(READ, local_idx, remote_idx)` picks descriptors by
     block index (NIXL merges runs contiguous on both sides into one descriptor), posts the
     READ and polls its state; then the handle is released (success, error, timeout and
     cancellation alike) and `notify_msg` goes to the peer as a NIXL notification.
  4. Serve side: notifications() polls get_new_notifs(); that call also drives the agent's UCX
     progress, which the first READ of every new peer (connection wire-up) waits for, and,
     under UCX's peer error handling, every READ posted after an earlier notice (measured on
     loopback: such a READ from a target that does not poll stalls until it does). So the
     serve side polls every notify_poll_busy_s while it holds blocks pinned for pullers, and
     backs off to notify_poll_idle_s when it holds none (wake(), called as blocks get
     pinned, ends that wait: no pull can start before the handle naming the blocks is out).
  5. close(): release descriptor lists, forget peers, deregister the pool, drop the agent.

Threading: every agent call runs on one thread per transport (the agent is created without
thread synchronization). Over UCX's shared-memory path (cma) transfer() copies the bytes
synchronously — ~100 ms for a 16k-token prompt — with the GIL released, so running it off
the event loop keeps the worker's loop and engine thread going during a pull. Pulls of one
transport therefore run one after another, which is also how they share the link.

The notice is sent after completion with send_notif rather than attached to the READ: an
attached notice makes the READ's completion wait for the *target* to progress (a pull then
takes as long as the prefill worker's poll interval), a separate one does not.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from splitserve.runtime.aio import wait_event

from .base import Notification, PoolLayout, pack_metadata, pull_indices, unpack_metadata
from .config import KvTransferConfig
from .errors import KvTransferError, KvTransferTimeout, KvTransportUnavailable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Cancelled(Exception):
    """The awaiting pull was cancelled; the transfer thread stops it."""


def _block_descs(layout: PoolLayout) -> np.ndarray:
    """Nx3 uint64 (addr, len, dev_id): one descriptor per block of `layout`."""
    n = layout.num_blocks
    descs = np.empty((n, 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(layout.base_addr) + np.arange(n, dtype=np.uint64) * np.uint64(layout.block_bytes)
    descs[:, 1] = layout.block_bytes
    descs[:, 2] = layout.device_index
    return descs


def _route_nixl_logging() -> None:
    """Send nixl's Python log records through the application's logging, not to stdout.

    nixl configures its "nixl" logger with its own handler on sys.stdout at INFO (which would
    interleave with a CLI's JSON on stdout) and propagate=False. Drop that handler, propagate,
    and keep its routine INFO lines out unless NIXL_LOG_LEVEL asked for another level.
    """
    nixl_logger = logging.getLogger("nixl")
    for handler in list(nixl_logger.handlers):
        nixl_logger.removeHandler(handler)
    nixl_logger.propagate = True
    if nixl_logger.level == logging.INFO:
        nixl_logger.setLevel(logging.WARNING)


def _mem_type(layout: PoolLayout) -> str:
    return "VRAM" if layout.device_type == "cuda" else "DRAM"


class _Peer:
    __slots__ = ("name", "metadata", "layout", "dlist")

    def __init__(self, name: str, metadata: bytes, layout: PoolLayout, dlist: Any) -> None:
        self.name = name
        self.metadata = metadata
        self.layout = layout
        self.dlist = dlist


class NixlTransport:
    """KvTransport over NIXL; see the module docstring for the lifecycle."""

    kind = "nixl"

    def __init__(self, name: str, kv_cache: torch.Tensor, config: KvTransferConfig | None = None) -> None:
        self.config = config or KvTransferConfig()
        self.name = name
        self.layout = PoolLayout.of(kv_cache)
        self._kv_cache = kv_cache  # keep the registered memory alive as long as the agent
        self._agent: Any = None
        self._reg: Any = None
        self._local_dlist: Any = None
        self._peers: dict[str, _Peer] = {}
        self._unreleased: list[Any] = []  # xfer handles NIXL refused to release (still in flight)
        self._closed = False
        self._wake: asyncio.Event | None = None  # set by wake(): ends notifications()' idle wait
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nixl-{name}")
        try:
            self._metadata: bytes = self._thread.submit(self._open_sync).result()
        except BaseException:
            self._thread.submit(self._close_sync).result()
            self._thread.shutdown(wait=True)
            raise

    # -- agent thread helpers ------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open_sync(self) -> bytes:
        raise_exceptions = logging.raiseExceptions
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except Exception as exc:  # ImportError, or a broken native library
            raise KvTransportUnavailable(f"nixl is not importable: {exc}") from exc
        finally:
            logging.raiseExceptions = raise_exceptions  # nixl's logging setup turns it off globally
        _route_nixl_logging()
        try:
            self._agent = nixl_agent(
                self.name,
                nixl_agent_config(
                    enable_prog_thread=self.config.nixl_progress_thread,
                    backends=list(self.config.nixl_backends),
                ),
            )
        except Exception as exc:  # noqa: BLE001 - no plugin, UCX failing to start, ...
            raise KvTransportUnavailable(f"NIXL agent did not start: {exc}") from exc
        missing = [b for b in self.config.nixl_backends if b not in self._agent.backends]
        if missing:
            raise KvTransportUnavailable(f"NIXL backend(s) {missing} did not initialize")
        mem_type = _mem_type(self.layout)
        try:
            self._reg = self._agent.register_memory(self._kv_cache)
            self._local_dlist = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", _block_descs(self.layout), mem_type)
        except Exception as exc:  # noqa: BLE001
            raise KvTransportUnavailable(f"NIXL could not register the KV pool ({mem_type}): {exc}") from exc
        logger.debug("NIXL agent %s registered %d blocks x %d B (%s)", self.name, self.layout.num_blocks,
                     self.layout.block_bytes, mem_type)
        return pack_metadata(self.kind, self.name, self.layout, agent_md=self._agent.get_agent_metadata())

    # -- peers ---------------------------------------------------------------------------------
    def local_metadata(self) -> bytes:
        return self._metadata

    async def add_peer(self, metadata: bytes) -> str:
        self._check_open()
        md = unpack_metadata(metadata, self.kind)
        name, layout = md["name"], md["pool"]
        known = self._peers.get(name)
        if known is not None:
            if known.metadata == metadata:
                return name
            logger.info("KV peer %s changed its metadata (restarted?); reloading it", name)
            await self.remove_peer(name)
        if name == self.name:
            raise KvTransferError(f"peer name {name!r} is this transport's own name", peer=name)
        self.layout.check_compatible(layout, name)
        dlist = await self._call(self._add_peer_sync, name, md["agent_md"], layout)
        self._peers[name] = _Peer(name, metadata, layout, dlist)
        logger.info("KV peer %s added (nixl, %d blocks)", name, layout.num_blocks)
        return name

    def _add_peer_sync(self, name: str, agent_md: bytes, layout: PoolLayout) -> Any:
        loaded = None
        try:
            loaded = self._agent.add_remote_agent(agent_md)
            if isinstance(loaded, bytes):
                loaded = loaded.decode()
            if loaded != name:
                raise KvTransferError(f"NIXL metadata names agent {loaded!r}, envelope says {name!r}", peer=name)
            dlist = self._agent.prep_xfer_dlist(name, _block_descs(layout), _mem_type(layout))
        except Exception as exc:  # noqa: BLE001
            if loaded is not None:
                self._agent.remove_remote_agent(loaded)
            if isinstance(exc, KvTransferError):
                raise
            raise KvTransferError(f"could not load NIXL peer {name!r}: {exc}", peer=name) from exc
        try:
            self._agent.make_connection(name)  # starts the wire-up now rather than in the first pull
        except Exception as exc:  # noqa: BLE001
            logger.debug("NIXL make_connection(%s) failed (the first pull connects): %s", name, exc)
        return dlist

    async def remove_peer(self, peer: str) -> None:
        p = self._peers.pop(peer, None)
        if p is not None:
            await self._call(self._remove_peer_sync, p)

    def _remove_peer_sync(self, p: _Peer) -> None:
        self._retry_unreleased()
        try:
            p.dlist.release()
        finally:
            try:
                self._agent.remove_remote_agent(p.name)
            except Exception as exc:  # noqa: BLE001 - already disconnected
                logger.debug("NIXL remove_remote_agent(%s): %s", p.name, exc)

    # -- pull ----------------------------------------------------------------------------------
    async def pull(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes = b"",
        timeout_s: float | None = None,
    ) -> None:
        self._check_open()
        p = self._peers.get(peer)
        if p is None:
            raise KvTransferError(f"unknown KV peer {peer!r}; add_peer() its metadata first", peer=peer)
        remote_idx, local_idx = pull_indices(peer, p.layout, self.layout, remote_block_ids,
                                             local_block_ids)
        timeout = self.config.timeout_s if timeout_s is None else float(timeout_s)
        cancel = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(
            self._thread, self._pull_sync, p, remote_idx, local_idx, bytes(notify_msg),
            time.monotonic() + timeout, timeout, cancel,
        )
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Stop the transfer and wait for the thread to let go of the local blocks before the
            # caller may reuse them.
            cancel.set()
            await asyncio.wait({fut})
            if not fut.cancelled() and fut.exception() is not None and not isinstance(fut.exception(), _Cancelled):
                logger.debug("cancelled KV pull from %s ended with %r", peer, fut.exception())
            raise

    def _pull_sync(
        self, p: _Peer, remote_idx: np.ndarray, local_idx: np.ndarray, notify_msg: bytes,
        deadline: float, timeout: float, cancel: threading.Event,
    ) -> None:
        if cancel.is_set():
            raise _Cancelled()
        if time.monotonic() >= deadline:
            raise KvTransferTimeout(f"KV pull from {p.name!r} waited {timeout:.3g} s behind other pulls", peer=p.name)
        if remote_idx.size:
            self._read_sync(p, remote_idx, local_idx, deadline, timeout, cancel)
        if notify_msg:
            try:
                self._agent.send_notif(p.name, notify_msg)
            except Exception as exc:  # noqa: BLE001 - the data is already here
                logger.warning("KV pull from %s done but its notice was not sent: %s", p.name, exc)

    def _read_sync(
        self, p: _Peer, remote_idx: np.ndarray, local_idx: np.ndarray,
        deadline: float, timeout: float, cancel: threading.Event,
    ) -> None:
        agent = self._agent
        try:
            handle = agent.make_prepped_xfer("READ", self._local_dlist, local_idx, p.dlist, remote_idx)
        except Exception as exc:  # noqa: BLE001
            raise KvTransferError(f"NIXL could not build the READ from {p.name!r}: {exc}", peer=p.name) from exc
        start = time.monotonic()
        try:
            state = agent.transfer(handle)
            while state == "PROC":
                if cancel.is_set():
                    raise _Cancelled()
                now = time.monotonic()
                if now >= deadline:
                    raise KvTransferTimeout(
                        f"KV pull of {remote_idx.size} blocks from {p.name!r} timed out after {timeout:.3g} s",
                        peer=p.name,
                    )
                delay = min(max((now - start) * 0.1, self.config.poll_min_s), self.config.poll_max_s)
                time.sleep(min(delay, deadline - now))
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise KvTransferError(f"NIXL READ from {p.name!r} failed (state {state})", peer=p.name)
        except KvTransferError as exc:
            exc.handle_released = self._release(handle)
            raise
        except _Cancelled:
            self._release(handle)
            raise
        except Exception as exc:  # noqa: BLE001 - nixlRemoteDisconnectError, nixlBackendError, ...
            released = self._release(handle)
            raise KvTransferError(
                f"NIXL READ from {p.name!r} failed: {type(exc).__name__}: {exc}", peer=p.name, handle_released=released
            ) from exc
        self._release(handle)

    def _release(self, handle: Any) -> bool:
        """Release an xfer handle (NIXL cancels it if still in flight); False if NIXL refused."""
        try:
            handle.release()
            return True
        except Exception as exc:  # noqa: BLE001
            logger.error("NIXL refused to release a transfer (kept for retry; its blocks may still be written): %s", exc)
            self._unreleased.append(handle)
            return False

    def _retry_unreleased(self) -> None:
        still = []
        for handle in self._unreleased:
            try:
                handle.release()
            except Exception:  # noqa: BLE001
                still.append(handle)
        self._unreleased = still

    @property
    def num_unreleased(self) -> int:
        """Transfers NIXL refused to release so far (0 unless a cancel failed)."""
        return len(self._unreleased)

    # -- serve side ----------------------------------------------------------------------------
    async def notifications(self, expecting: Callable[[], bool] | None = None) -> AsyncIterator[Notification]:
        delay = self.config.notify_poll_min_s
        idle_cap = self.config.notify_poll_max_s if expecting is None else self.config.notify_poll_idle_s
        self._wake = wake = asyncio.Event()
        while not self._closed:
            busy = expecting is not None and expecting()
            try:
                if busy:
                    notifs = await self._call(self._poll_window_sync)
                else:
                    notifs = await self._call(self._agent.get_new_notifs)
            except Exception as exc:  # noqa: BLE001
                if self._closed:
                    return
                raise KvTransferError(f"NIXL get_new_notifs failed: {exc}") from exc
            if notifs:
                delay = self.config.notify_poll_min_s
                for peer, msgs in notifs.items():
                    peer_name = peer.decode() if isinstance(peer, bytes) else str(peer)
                    for msg in msgs:
                        yield Notification(peer_name, bytes(msg))
            elif not busy:
                if await wait_event(wake, delay):
                    wake.clear()
                    delay = self.config.notify_poll_min_s
                else:
                    delay = min(delay * 2, idle_cap)

    def wake(self) -> None:
        """Blocks were just pinned for a puller: notifications() looks (and progresses UCX)
        now rather than at the end of its idle wait. Call on the consumer's event loop."""
        if self._wake is not None:
            self._wake.set()

    def _poll_window_sync(self) -> dict:
        """Look for notices every notify_poll_busy_s for up to notify_busy_window_s; return at
        the first. Each look also progresses UCX, which pending READs of our blocks need."""
        end = time.monotonic() + self.config.notify_busy_window_s
        while True:
            notifs = self._agent.get_new_notifs()
            if notifs or self._closed or time.monotonic() >= end:
                return notifs
            time.sleep(self.config.notify_poll_busy_s)

    # -- teardown ------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        peers, self._peers = list(self._peers.values()), {}
        try:
            for p in peers:
                await self._call(self._remove_peer_sync, p)
            await self._call(self._close_sync)
        finally:
            self._thread.shutdown(wait=False)  # the jobs above ran after every earlier one
        logger.debug("NIXL agent %s closed", self.name)

    def _close_sync(self) -> None:
        self._retry_unreleased()
        if self._unreleased:
            logger.error("NIXL agent %s closes with %d transfers it refused to release", self.name, len(self._unreleased))
        if self._local_dlist is not None:
            self._local_dlist.release()
            self._local_dlist = None
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            finally:
                self._reg = None
        self._agent = None  # the agent is destroyed here, on its own thread

    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError(f"KV transport {self.name!r} is closed")

    def __repr__(self) -> str:
        return f"NixlTransport(name={self.name!r}, blocks={self.layout.num_blocks}, peers={len(self._peers)})"
