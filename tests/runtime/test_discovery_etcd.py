"""etcd backend: live tests against a private etcd that the tests stop, restart and wipe."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from splitserve.runtime.discovery import DiscoveryUnavailableError, WorkerRecord, open_discovery
from tests.helpers.etcd import free_port

pytestmark = pytest.mark.live


def rec(worker_id: str, role: str = "prefill", port: int = 9000) -> WorkerRecord:
    return WorkerRecord(id=worker_id, role=role, address=f"127.0.0.1:{port}", model="m", block_size=16)


async def test_restart_keeps_registrations_and_watchers(etcd_server_private, collect, until):
    etcd = etcd_server_private
    owner = await open_discovery(etcd.url)
    watcher = await open_discovery(etcd.url)
    try:
        await owner.register(rec("p0"), ttl_s=2)
        events = collect(watcher)
        await events.wait_for(("put", "p0"))

        await asyncio.to_thread(etcd.stop)
        await asyncio.sleep(2.5)  # down for longer than the TTL
        await asyncio.to_thread(etcd.start)

        async def p0_listed() -> bool:
            return [r.id for r in await watcher.list()] == ["p0"]

        await until(p0_listed, 5)
        # the watcher reconnected: it sees changes made after the restart
        d0 = await owner.register(rec("d0", "decode", 9001), ttl_s=2)
        await events.wait_for(("put", "d0"))
        await owner.deregister(d0)
        await events.wait_for(("delete", "d0"))
        await asyncio.sleep(2.5)  # and the keep-alive still renews p0's lease past its TTL
        assert [r.id for r in await watcher.list()] == ["p0"]
        assert ("delete", "p0") not in events.events
    finally:
        await owner.close()
        await watcher.close()


async def test_wiped_etcd_gets_registrations_again(etcd_server_private, collect, until):
    etcd = etcd_server_private
    owner = await open_discovery(etcd.url)
    watcher = await open_discovery(etcd.url)
    try:
        handle = await owner.register(rec("p0"), ttl_s=2)
        first_lease = handle.lease_id
        events = collect(watcher)
        await events.wait_for(("put", "p0"))

        await asyncio.to_thread(etcd.stop)
        shutil.rmtree(etcd.data_dir)  # a new etcd with no data, same address
        await asyncio.to_thread(etcd.start)

        async def p0_listed() -> bool:
            return [r.id for r in await watcher.list()] == ["p0"]

        await until(p0_listed, 5)  # re-put under a new lease by the keep-alive task
        assert handle.lease_id != first_lease
        # the watcher noticed the history reset and follows the new etcd
        await owner.register(rec("d0", "decode", 9001), ttl_s=2)
        await events.wait_for(("put", "d0"))
    finally:
        await owner.close()
        await watcher.close()


async def test_unreachable_etcd_raises_after_timeout():
    disc = await open_discovery(f"etcd://127.0.0.1:{free_port()}?timeout=0.5")
    try:
        start = time.monotonic()
        with pytest.raises(DiscoveryUnavailableError, match="unreachable"):
            await disc.register(rec("p0"), ttl_s=2)
        with pytest.raises(DiscoveryUnavailableError):
            await disc.list()
        assert time.monotonic() - start < 5
    finally:
        await disc.close()


async def test_watch_waits_for_etcd_to_come_up(tmp_path, collect):
    from tests.helpers.etcd import EtcdServer, ensure_etcd_binary

    binary = ensure_etcd_binary()
    if binary is None:
        pytest.skip("etcd is not installed and could not be installed")
    etcd = EtcdServer(tmp_path / "etcd", binary=binary)
    watcher = await open_discovery(etcd.url)  # nothing listens yet
    events = collect(watcher)
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(etcd.start)
        owner = await open_discovery(etcd.url)
        try:
            await owner.register(rec("late"), ttl_s=2)
            await events.wait_for(("put", "late"), 5)
        finally:
            await owner.close()
    finally:
        await watcher.close()
        etcd.stop()
