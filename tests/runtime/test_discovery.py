"""The discovery contract, run against both backends (a real etcd, and the embedded
directory backend), plus record and URL unit tests."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from splitserve.runtime.discovery import (
    BACKENDS,
    Discovery,
    DiscoveryConfigError,
    InvalidRecordError,
    WatchEvent,
    WorkerRecord,
    open_discovery,
)
from splitserve.runtime.discovery.embedded import EmbeddedConfig, default_base_dir, embedded_url


def rec(worker_id: str = "p0", role: str = "prefill", port: int = 9000, **kw) -> WorkerRecord:
    return WorkerRecord(id=worker_id, role=role, address=f"127.0.0.1:{port}", model="smollm2-135m",
                        block_size=16, **kw)


# ------------------------------------------------------------------ records and URLs
def test_record_json_round_trip():
    r = rec(nixl_metadata=bytes(range(256)), extra={"agent": "p0-agent", "gpus": [0, 1]})
    text = r.to_json()
    assert '"nixl_metadata":"AAECAw' in text  # base64 in JSON
    back = WorkerRecord.from_json(text)
    assert back == r and back.nixl_metadata == bytes(range(256))
    assert WorkerRecord.from_json(rec().to_json()).nixl_metadata is None


@pytest.mark.parametrize(
    "kw",
    [
        {"id": ""}, {"id": "a/b"}, {"role": "router"}, {"address": "nohost"}, {"address": "h:0"},
        {"block_size": 0}, {"block_size": True}, {"model": ""}, {"nixl_metadata": "text"},
    ],
)
def test_record_validation(kw):
    base = dict(id="w0", role="decode", address="h:1", model="m", block_size=16)
    with pytest.raises(InvalidRecordError):
        WorkerRecord(**{**base, **kw})


def test_record_decode_errors():
    for bad in ("not json", "[]", '{"id": "x"}', rec().to_json().replace('"role":"prefill"', '"role":"x"')):
        with pytest.raises(InvalidRecordError):
            WorkerRecord.from_json(bad)
    with pytest.raises(InvalidRecordError):
        rec(extra={"x": object()}).to_json()


async def test_open_discovery_rejects_bad_urls(tmp_path):
    assert set(BACKENDS) == {"etcd", "embedded"}
    for url in ("redis://x", "etcd://", "etcd://h:notaport", "etcd://h:1?bogus=1", "embedded://",
                "embedded://bad name", "embedded://a/b"):
        with pytest.raises(DiscoveryConfigError):
            await open_discovery(url)
    with pytest.raises(DiscoveryConfigError):
        await open_discovery(f"embedded://{tmp_path}", poll_interval_s=0)


def test_etcd_url_parsing():
    from splitserve.runtime.discovery.etcd import EtcdConfig

    c = EtcdConfig.from_url("etcd://etcd")
    assert c.endpoints == ("etcd:2379",) and c.namespace == "/splitserve"
    c = EtcdConfig.from_url("etcd://10.0.0.1:2380,10.0.0.2:2380/prod/llm/?timeout=2.5")
    assert c.endpoints == ("10.0.0.1:2380", "10.0.0.2:2380")
    assert c.namespace == "/prod/llm" and c.timeout_s == 2.5


def test_embedded_dirs_are_per_deployment(tmp_path):
    a = EmbeddedConfig.from_url("embedded://deploy-a").directory
    b = EmbeddedConfig.from_url("embedded://", deployment="deploy-b").directory
    assert a != b and a.parent.parent == b.parent.parent == default_base_dir()
    assert EmbeddedConfig.from_url(embedded_url("x"), base_dir=tmp_path).directory == tmp_path / "x" / "discovery"
    assert EmbeddedConfig.from_url(f"embedded://{tmp_path}/d?poll=0.5").directory == Path(f"{tmp_path}/d")


# ------------------------------------------------------------------ contract, both backends

@pytest.mark.live
async def test_register_and_list(discovery_url):
    a = await open_discovery(discovery_url)
    b = await open_discovery(discovery_url)
    try:
        assert isinstance(a, Discovery)
        assert await b.list() == []
        p0 = rec("p0", nixl_metadata=b"\x00meta\xff")
        d0 = rec("d0", "decode", 9001, extra={"max_batch": 8})
        await a.register(p0, ttl_s=5)
        await a.register(d0, ttl_s=5)
        assert await b.list() == [d0, p0]  # sorted by (role, id)
        assert await b.list("prefill") == [p0]
        assert await b.list(role="decode") == [d0]
        assert (await b.list("prefill"))[0].nixl_metadata == b"\x00meta\xff"
        with pytest.raises(DiscoveryConfigError):
            await b.list("router")
    finally:
        await a.close()
        await b.close()


@pytest.mark.live
async def test_watch_sees_put_and_delete(discovery_url, collect):
    owner = await open_discovery(discovery_url)
    watcher = await open_discovery(discovery_url)
    try:
        early = await owner.register(rec("p0"), ttl_s=5)
        events = collect(watcher)
        await events.wait_for(("put", "p0"))  # replay of what was there before the watch
        handle = await owner.register(rec("d1", "decode", 9001), ttl_s=5)
        await events.wait_for(("put", "d1"))
        await owner.deregister(handle)
        await events.wait_for(("delete", "d1"))
        await owner.deregister(handle)  # idempotent
        await owner.deregister(early)
        await events.wait_for(("delete", "p0"))
        assert events.events == [("put", "p0"), ("put", "d1"), ("delete", "d1"), ("delete", "p0")]
        assert all(isinstance(r, WorkerRecord) for r in events.records)
        assert await watcher.list() == []
    finally:
        await owner.close()
        await watcher.close()


@pytest.mark.live
async def test_reregister_replaces_record(discovery_url, collect):
    owner = await open_discovery(discovery_url)
    watcher = await open_discovery(discovery_url)
    try:
        events = collect(watcher)
        old = await owner.register(rec("p0", port=9000), ttl_s=5)
        await events.wait_for(("put", "p0"))
        await owner.register(rec("p0", port=9100), ttl_s=5)
        await asyncio.sleep(0.5)
        assert [r.address for r in await watcher.list()] == ["127.0.0.1:9100"]
        assert events.records[-1].address == "127.0.0.1:9100"
        await owner.deregister(old)  # the stale handle must not remove the newer record
        await asyncio.sleep(0.5)
        assert [r.address for r in await watcher.list()] == ["127.0.0.1:9100"]
    finally:
        await owner.close()
        await watcher.close()


@pytest.mark.live
async def test_close_deregisters_and_ends_watch(discovery_url):
    owner = await open_discovery(discovery_url)
    other = await open_discovery(discovery_url)
    try:
        await owner.register(rec("p0"), ttl_s=30)
        gen = owner.watch()
        assert await asyncio.wait_for(gen.__anext__(), 5) == WatchEvent("put", rec("p0"))

        async def rest() -> list[WatchEvent]:
            return [event async for event in gen]

        pending = asyncio.ensure_future(rest())
        await asyncio.sleep(0.1)
        await owner.close()
        await owner.close()  # idempotent
        tail = await asyncio.wait_for(pending, 5)  # the watch ends with the discovery
        assert all(event.type == "delete" for event in tail), tail
        assert await other.list() == []  # gone at once, not after 30 s
    finally:
        await other.close()


@pytest.mark.live
async def test_sigkilled_registrant_disappears_within_ttl(discovery_url, spawn_registrant, until):
    ttl = 2.0
    observer = await open_discovery(discovery_url)
    try:
        worker = spawn_registrant(discovery_url, "victim", "decode", ttl_s=ttl)
        worker.wait_registered()
        assert [r.id for r in await observer.list()] == ["victim"]
        await asyncio.sleep(ttl)  # kept alive past its TTL by the keep-alive/heartbeat
        assert [r.id for r in await observer.list()] == ["victim"]
        killed_at = time.monotonic()
        worker.signal(signal.SIGKILL)

        async def gone() -> bool:
            return await observer.list() == []

        await until(gone, ttl + 2.0)
        elapsed = time.monotonic() - killed_at
        assert elapsed <= ttl + 1.5, elapsed
    finally:
        await observer.close()


@pytest.mark.live
async def test_sigterm_registrant_deregisters_at_once(discovery_url, spawn_registrant, until):
    observer = await open_discovery(discovery_url)
    try:
        worker = spawn_registrant(discovery_url, "leaver", "prefill", ttl_s=30)
        worker.wait_registered()
        worker.signal(signal.SIGTERM)

        async def gone() -> bool:
            return await observer.list() == []

        assert await until(gone, 5.0) < 5.0  # far below the 30 s TTL
        assert worker.proc.wait(timeout=5) == 0
    finally:
        await observer.close()
