"""Embedded backend specifics: per-deployment directories, heartbeats, expiry and reaping."""

from __future__ import annotations

import asyncio
import json
import os
import time

from splitserve.runtime.discovery import WorkerRecord, open_discovery


def rec(worker_id: str, role: str = "prefill") -> WorkerRecord:
    return WorkerRecord(id=worker_id, role=role, address="127.0.0.1:9000", model="m", block_size=16)


async def test_deployments_do_not_see_each_other(tmp_path):
    a = await open_discovery("embedded://dep-a", base_dir=tmp_path)
    b = await open_discovery("embedded://dep-b", base_dir=tmp_path)
    try:
        await a.register(rec("p0"), ttl_s=5)
        assert await b.list() == []
        assert [r.id for r in await a.list()] == ["p0"]
        assert a.directory != b.directory and a.directory.exists()
        assert oct(a.directory.stat().st_mode & 0o777) == oct(0o700)
    finally:
        await a.close()
        await b.close()


async def test_heartbeat_keeps_alive_and_rewrites_a_removed_file(tmp_path):
    url = f"embedded://{tmp_path}/d"
    owner = await open_discovery(url)
    reader = await open_discovery(url)
    try:
        handle = await owner.register(rec("p0"), ttl_s=1.0)
        await asyncio.sleep(1.5)  # past the TTL: only the heartbeat keeps it live
        assert [r.id for r in await reader.list()] == ["p0"]
        os.unlink(handle.key)  # someone removed it
        assert await reader.list() == []
        await asyncio.sleep(0.6)
        assert [r.id for r in await reader.list()] == ["p0"]  # written again
    finally:
        await owner.close()
        await reader.close()


async def test_stale_files_expire_and_are_reaped_and_junk_is_ignored(tmp_path, collect):
    directory = tmp_path / "d"
    directory.mkdir()
    stale = directory / "decode.ghost.json"
    stale.write_text(json.dumps({"record": rec("ghost", "decode").to_dict(), "ttl_s": 1.0}))
    (directory / "prefill.junk.json").write_text("{not json")
    (directory / "notes.txt").write_text("ignored")
    reader = await open_discovery(f"embedded://{directory}?poll=0.05")
    try:
        events = collect(reader)
        await events.wait_for(("put", "ghost"))
        old = time.time() - 1.5
        os.utime(stale, (old, old))  # not renewed for more than its TTL
        await events.wait_for(("delete", "ghost"))
        assert stale.exists()  # expired, not yet reaped
        old = time.time() - 2.5
        os.utime(stale, (old, old))  # dead for two TTLs
        assert await reader.list() == []
        assert not stale.exists()
    finally:
        await reader.close()
