"""Unit tests of the KV transport plumbing: config, metadata, pool layout, transport choice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import pytest
import torch

from splitserve.kv_transfer import (
    KvTransferConfig,
    KvTransferError,
    KvTransportUnavailable,
    PoolLayout,
    create_transport,
)
from splitserve.kv_transfer.base import block_index_array, pack_metadata, unpack_metadata

from tests.kv_transfer.peer import BLOCK_SHAPE, make_pool


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="timeout_s"):
        KvTransferConfig(timeout_s=0)
    with pytest.raises(ValueError, match="poll_max_s"):
        KvTransferConfig(poll_min_s=0.1, poll_max_s=0.01)
    with pytest.raises(ValueError, match="grpc_chunk_bytes"):
        KvTransferConfig(grpc_chunk_bytes=0)


async def test_unknown_kind_and_bad_pool():
    with pytest.raises(ValueError, match="auto, nixl, grpc"):
        await create_transport("rdma", "x", make_pool(torch.float32, 4))
    with pytest.raises(ValueError, match="contiguous"):
        PoolLayout.of(make_pool(torch.float32, 4).transpose(0, 1))


def test_layout_and_metadata_roundtrip():
    pool = make_pool(torch.bfloat16, 6)
    layout = PoolLayout.of(pool)
    assert layout.block_bytes == pool[0].nbytes == 2 * torch.Size(BLOCK_SHAPE).numel()
    assert (layout.num_blocks, layout.dtype, layout.device_type) == (6, "bfloat16", "cpu")
    md = unpack_metadata(pack_metadata("grpc", "w0", layout, address="127.0.0.1:1"), "grpc")
    assert md["pool"] == layout and md["name"] == "w0" and md["address"] == "127.0.0.1:1"
    with pytest.raises(KvTransferError, match="same --kv-transport"):
        unpack_metadata(pack_metadata("nixl", "w0", layout), "grpc")
    with pytest.raises(KvTransferError, match="malformed"):
        unpack_metadata(b"\x00junk", "grpc")
    other = PoolLayout.of(make_pool(torch.float32, 6))
    with pytest.raises(KvTransferError, match="blocks float32"):
        layout.check_compatible(other, "w1")


def test_block_ids_are_checked():
    assert block_index_array([0, 5, 2], 6, "local").tolist() == [0, 5, 2]
    with pytest.raises(KvTransferError, match="out of range"):
        block_index_array([6], 6, "local")
    with pytest.raises(KvTransferError, match="out of range"):
        block_index_array([-1], 6, "remote")


async def test_auto_uses_nixl_here_and_says_so(caplog):
    pytest.importorskip("nixl")
    caplog.set_level(logging.INFO, logger="splitserve.kv_transfer")
    t = await create_transport("auto", "auto-unit", make_pool(torch.float32, 4))
    try:
        assert t.kind == "nixl"
        assert "KV transport: nixl" in caplog.text
    finally:
        await t.close()


async def test_auto_falls_back_to_grpc_without_nixl(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # `from nixl._api import ...` fails
    caplog.set_level(logging.INFO, logger="splitserve.kv_transfer")
    with pytest.raises(KvTransportUnavailable):
        await create_transport("nixl", "nixl-missing", make_pool(torch.float32, 4))
    t = await create_transport("auto", "auto-fallback", make_pool(torch.float32, 4))
    try:
        assert t.kind == "grpc"
        assert "KV transport: grpc (auto; NIXL unavailable" in caplog.text
    finally:
        await t.close()


@pytest.mark.parametrize("kind", ["nixl", "grpc"])
async def test_incompatible_peer_and_self_pull_refused(kind):
    if kind == "nixl":
        pytest.importorskip("nixl")
    a = await create_transport(kind, f"a-{kind}", make_pool(torch.bfloat16, 4))
    b = await create_transport(kind, f"b-{kind}", make_pool(torch.float32, 4))
    try:
        with pytest.raises(KvTransferError, match="local blocks are float32"):
            await b.add_peer(a.local_metadata())
        with pytest.raises(KvTransferError, match="unknown KV peer"):
            await b.pull(a.name, [0], [0])
    finally:
        await a.close()
        await b.close()
    await a.close()  # idempotent
    with pytest.raises(KvTransferError, match="closed"):
        await a.pull("x", [0], [0])


class _CountingAgent:
    """A NIXL agent whose get_new_notifs calls (the serve side's looks) are counted."""

    def __init__(self, agent):
        self._agent = agent
        self.looks = 0

    def get_new_notifs(self):
        self.looks += 1
        return self._agent.get_new_notifs()

    def __getattr__(self, name):
        return getattr(self._agent, name)


async def _idle_consumer(config, expecting):
    pytest.importorskip("nixl")
    t = await create_transport("nixl", f"idle-{id(config)}", make_pool(torch.float32, 4), config)
    agent = t._agent = _CountingAgent(t._agent)

    async def consume():
        async for _ in t.notifications(expecting=expecting):
            pass

    return t, agent, asyncio.create_task(consume())


async def _stop(t, task):
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    t._agent = t._agent._agent
    await t.close()


async def test_idle_serve_side_looks_rarely_while_nothing_is_pinned():
    """With nothing pinned (`expecting` False) the notification loop backs off to
    notify_poll_idle_s, not to the 10 ms it keeps for consumers that cannot say: each look
    wakes two threads, ~5 % of a prefill worker's core at 100 a second."""
    t, agent, task = await _idle_consumer(KvTransferConfig(notify_poll_idle_s=0.25), lambda: False)
    try:
        await asyncio.sleep(1.5)
        # 1, 2, 4, ... 128 ms then 250 ms waits: ~12 looks; the 10 ms cap would make ~100
        assert 3 <= agent.looks <= 25, agent.looks
    finally:
        await _stop(t, task)


async def test_wake_ends_the_idle_wait_at_once():
    """wake() (blocks just pinned) makes the loop look now, not when its idle wait ends."""
    # every idle wait 30 s: without wake() no second look comes within the test
    config = KvTransferConfig(notify_poll_min_s=30.0, notify_poll_max_s=30.0, notify_poll_idle_s=30.0)
    pinned = {"now": False}
    t, agent, task = await _idle_consumer(config, lambda: pinned["now"])
    try:
        for _ in range(100):
            if agent.looks:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert agent.looks == 1, agent.looks  # the first look, then the 30 s wait
        pinned["now"] = True
        t.wake()
        for _ in range(100):
            if agent.looks > 1:
                break
            await asyncio.sleep(0.05)
        assert agent.looks > 1, "wake() did not end the idle wait"
    finally:
        pinned["now"] = False
        await _stop(t, task)
