"""Live KV transfers between real processes on loopback, over NIXL and the gRPC fallback.

A child process serves pools of known bytes (tests/kv_transfer/peer.py); this process pulls
non-contiguous blocks into other block ids, checks the bytes and the serve side's notice, and
checks that a frozen or killed peer ends a pull with KvTransferTimeout / KvTransferError,
with every transfer handle released.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch

from splitserve.kv_transfer import (
    KvTransferConfig,
    KvTransferError,
    KvTransferTimeout,
    create_transport,
)

from tests.kv_transfer.peer import NUM_BLOCKS, PeerProcess, block_pattern

pytestmark = pytest.mark.live

KINDS = ["nixl", "grpc"]
DTYPES = ["bfloat16", "float32", "float8_e4m3fn"]  # float8: `--kv-cache-dtype fp8`
# non-contiguous remote ids (with one contiguous run) into different, scattered local ids
REMOTE_IDS = [3, 4, 5, 17, 9, 30, 31, 0, 39]
LOCAL_IDS = [10, 11, 12, 2, 38, 20, 7, 25, 1]


@pytest.fixture(scope="module", params=KINDS)
def server(request):
    # small gRPC messages (3 blocks) so a pull streams several of them
    peer = PeerProcess(request.param, DTYPES, f"srv-{uuid.uuid4().hex[:8]}", grpc_chunk_bytes=3 * 4608)
    yield request.param, peer
    report = peer.stop()
    assert report == {dt: 0 for dt in DTYPES}, f"serve side did not close cleanly: {report}"


def _empty_pool(dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((NUM_BLOCKS, *block_pattern(0, dtype).shape), dtype=dtype)


@pytest.mark.parametrize("dtype_name", DTYPES)
async def test_pull_blocks_between_processes(server, dtype_name):
    kind, peer_proc = server
    assert peer_proc.kinds[dtype_name] == kind
    dtype = getattr(torch, dtype_name)
    pool = _empty_pool(dtype)
    client = await create_transport(kind, f"cli-{uuid.uuid4().hex[:8]}", pool)
    try:
        assert client.kind == kind
        peer = await client.add_peer(peer_proc.metadata[dtype_name])
        assert await client.add_peer(peer_proc.metadata[dtype_name]) == peer  # cached
        for attempt in range(2):  # the first pull also sets up the connection
            pool.zero_()
            msg = f"pulled-{dtype_name}-{attempt}-{uuid.uuid4().hex}".encode()
            await client.pull(peer, REMOTE_IDS, LOCAL_IDS, notify_msg=msg, timeout_s=20)
            for r, loc in zip(REMOTE_IDS, LOCAL_IDS):
                assert torch.equal(pool[loc], block_pattern(r, dtype)), f"block {r} -> {loc}"
            untouched = sorted(set(range(NUM_BLOCKS)) - set(LOCAL_IDS))
            assert not pool[untouched].any(), "a block outside the pull was written"
            note = await asyncio.to_thread(peer_proc.wait_notice, msg, 10.0)
            assert note == (dtype_name, client.name, msg)
        # an empty pull moves nothing but still notifies
        await client.pull(peer, [], [], notify_msg=b"empty-" + msg)
        assert await asyncio.to_thread(peer_proc.wait_notice, b"empty-" + msg, 10.0) is not None
        with pytest.raises(KvTransferError, match="out of range"):
            await client.pull(peer, [NUM_BLOCKS], [0])
        with pytest.raises(KvTransferError, match="local block ids"):
            await client.pull(peer, [1, 2], [0])
    finally:
        await client.close()
    assert getattr(client, "num_unreleased", 0) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_frozen_then_killed_peer(kind):
    """SIGSTOP: a pull times out (and a cancelled pull returns); SIGKILL: a pull fails."""
    victim = PeerProcess(kind, ["bfloat16"], f"victim-{uuid.uuid4().hex[:8]}")
    pool = _empty_pool(torch.bfloat16)
    client = await create_transport(kind, f"cli-{uuid.uuid4().hex[:8]}", pool, KvTransferConfig(timeout_s=20))
    try:
        peer = await client.add_peer(victim.metadata["bfloat16"])
        victim.pause()

        t0 = time.monotonic()
        with pytest.raises(KvTransferTimeout) as info:
            await client.pull(peer, [1, 2, 3], [4, 5, 6], notify_msg=b"never", timeout_s=1.0)
        assert time.monotonic() - t0 < 8
        assert info.value.handle_released and info.value.peer == peer

        task = asyncio.create_task(client.pull(peer, [1], [4], timeout_s=30))
        await asyncio.sleep(0.3)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 5

        victim.kill()
        t0 = time.monotonic()
        with pytest.raises(KvTransferError):  # peer gone: an error (or, at worst, the timeout)
            await client.pull(peer, [1, 2, 3], [4, 5, 6], timeout_s=10.0)
        assert time.monotonic() - t0 < 15
        assert not victim.notices
        assert getattr(client, "num_unreleased", 0) == 0
        await client.remove_peer(peer)
        with pytest.raises(KvTransferError, match="unknown KV peer"):
            await client.pull(peer, [1], [4])
    finally:
        await client.close()
        victim.kill()
    assert getattr(client, "num_unreleased", 0) == 0
