"""A serve-side KV transport in a child process (spawn): pools of known bytes, notices back;
and pull_in_child, a pulling side in a child process.

The child builds one transport per dtype over a pool whose block i holds `block_pattern(i)`,
sends each transport's metadata, forwards every notification to the parent, and on "stop"
closes its transports and reports how that went.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import time
from typing import Any

#: (num_layers, 2, block_size, num_kv_heads, head_dim): small, the contract's layout.
BLOCK_SHAPE = (2, 2, 16, 3, 8)
NUM_BLOCKS = 40


def block_pattern(block_id: int, dtype: Any, salt: int = 0):
    """The bytes a test pool holds in block `block_id`: small integers, exact in bf16 (in
    float8, rounded: still distinct blocks, the values below 16 exact)."""
    import torch

    n = 1
    for d in BLOCK_SHAPE:
        n *= d
    vals = (torch.arange(n, dtype=torch.int64) * 7 + block_id * 31 + salt) % 251
    return vals.to(dtype).view(BLOCK_SHAPE)


def make_pool(dtype: Any, num_blocks: int = NUM_BLOCKS, salt: int = 0):
    import torch

    pool = torch.empty((num_blocks, *BLOCK_SHAPE), dtype=dtype)
    for i in range(num_blocks):
        pool[i] = block_pattern(i, dtype, salt)
    return pool


def _child(kind: str, dtypes: list[str], prefix: str, grpc_chunk_bytes: int, cmd_conn, evt_conn) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(kind, dtypes, prefix, grpc_chunk_bytes, cmd_conn, evt_conn))


async def _serve(kind, dtypes, prefix, grpc_chunk_bytes, cmd_conn, evt_conn) -> None:
    import torch

    from splitserve.kv_transfer import KvTransferConfig, create_transport

    config = KvTransferConfig(grpc_chunk_bytes=grpc_chunk_bytes)
    transports = {}
    for dt in dtypes:
        transports[dt] = await create_transport(kind, f"{prefix}-{dt}", make_pool(getattr(torch, dt)), config)

    async def forward(dt, t):
        async for note in t.notifications():
            evt_conn.send(("notice", dt, note.peer, note.msg))

    tasks = [asyncio.create_task(forward(dt, t)) for dt, t in transports.items()]
    evt_conn.send(("ready", {dt: t.local_metadata() for dt, t in transports.items()},
                   {dt: t.kind for dt, t in transports.items()}))
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, cmd_conn.recv) != "stop":
        pass
    for t in transports.values():
        await t.close()
    for task in tasks:  # close() ends the notification streams
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.TimeoutError:
            task.cancel()
    evt_conn.send(("closed", {dt: getattr(t, "num_unreleased", 0) for dt, t in transports.items()}))


def pull_in_child(metadata: bytes, shape: tuple, handles: list[tuple[str, list[int]]], gap_s: float,
                  conn) -> None:
    """Child process: a NIXL transport over an empty pool like the worker's; pull each
    handle's blocks (with its request id as the notice), `gap_s` apart, and report each
    pull's end time."""
    import torch

    from splitserve.kv_transfer import create_transport

    async def run() -> list[float]:
        pool = torch.zeros(shape, dtype=torch.float32)
        t = await create_transport("nixl", "puller", pool)
        try:
            peer = await t.add_peer(metadata)
            conn.send(("ready", time.time()))
            conn.recv()  # go
            ends = []
            for i, (rid, blocks) in enumerate(handles):
                if i:
                    await asyncio.sleep(gap_s)
                await t.pull(peer, blocks, list(range(len(blocks))), notify_msg=rid.encode(), timeout_s=30)
                ends.append(time.time())
            return ends
        finally:
            await t.close()

    try:
        conn.send(("done", asyncio.run(run())))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        conn.send(("error", repr(exc)))


class PeerProcess:
    """Parent-side handle of a serving child."""

    def __init__(self, kind: str, dtypes: list[str], prefix: str, grpc_chunk_bytes: int = 4 << 20) -> None:
        ctx = mp.get_context("spawn")
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._evt, evt_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child, args=(kind, dtypes, prefix, grpc_chunk_bytes, cmd_r, evt_w), daemon=True)
        self.proc.start()
        cmd_r.close()
        evt_w.close()
        self.notices: list[tuple[str, str, bytes]] = []
        msg = self._next(90.0, want="ready")
        if msg is None:
            self.kill()
            raise RuntimeError(f"KV peer process ({kind}) did not start")
        self.metadata: dict[str, bytes] = msg[1]
        self.kinds: dict[str, str] = msg[2]

    def _next(self, timeout: float, want: str):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                if not self._evt.poll(left):
                    return None
                msg = self._evt.recv()
            except (EOFError, OSError):
                return None
            if msg[0] == "notice":
                self.notices.append(msg[1:])
                if want == "notice":
                    return msg
            elif msg[0] == want:
                return msg

    def wait_notice(self, msg: bytes, timeout: float = 10.0) -> tuple[str, str, bytes] | None:
        """The (dtype, peer, msg) notice carrying `msg`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for note in self.notices:
                if note[2] == msg:
                    return note
            left = deadline - time.monotonic()
            if left <= 0 or self._next(left, want="notice") is None:
                return None

    def stop(self, timeout: float = 20.0) -> dict[str, int] | None:
        """Close the child's transports and let it exit; its report, or None if it was gone."""
        report = None
        if self.proc.is_alive():
            try:
                self._cmd.send("stop")
                msg = self._next(timeout, want="closed")
                report = msg[1] if msg else None
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout)
        self.kill()
        return report

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.join(10)
        self._cmd.close()
        self._evt.close()
