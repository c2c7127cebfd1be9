"""Fixtures of the runtime tests: real etcd servers (tests/helpers/etcd.py), discovery URLs
of each backend, registrant processes and watch collectors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from tests.helpers.etcd import etcd_server_fixture

# one etcd shared by the tests that only read and write it (each uses its own namespace)
etcd_server = etcd_server_fixture("etcd_server", scope="session")
# a private etcd for tests that stop, restart or wipe it
etcd_server_private = etcd_server_fixture("etcd_server_private", scope="function")


@pytest.fixture(params=["etcd", "embedded"])
def discovery_url(request, tmp_path) -> str:
    """A fresh discovery URL of each backend: its own etcd namespace, or its own directory."""
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        return f"{server.url}/t{uuid.uuid4().hex[:12]}"
    return f"embedded://{tmp_path / 'discovery'}"


class Registrant:
    """A separate process that registers one worker record and keeps it alive."""

    def __init__(self, url: str, worker_id: str, role: str, ttl_s: float) -> None:
        self.worker_id = worker_id
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.runtime.discovery", url, "register",
             "--id", worker_id, "--role", role, "--address", "127.0.0.1:9999", "--ttl", str(ttl_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_registered(self, timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                buf += chunk
                if b"\n" in buf:
                    return json.loads(buf.split(b"\n", 1)[0])
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"registrant exited with {self.proc.returncode}: {err[-2000:]}")
            time.sleep(0.05)
        raise AssertionError("registrant did not register in time")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn_registrant():
    """Factory of `Registrant` processes; every one is killed at teardown."""
    started: list[Registrant] = []

    def spawn(url: str, worker_id: str, role: str = "prefill", ttl_s: float = 2.0) -> Registrant:
        r = Registrant(url, worker_id, role, ttl_s)
        started.append(r)
        return r

    yield spawn
    for r in started:
        r.stop()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.05) -> float:
    """Await `predicate()` until true; returns the seconds it took, fails after `timeout_s`."""
    start = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


@pytest.fixture
def until():
    return wait_until


class Collector:
    """Runs `discovery.watch()` in a task and records `(type, id)` of every event."""

    def __init__(self, discovery) -> None:
        self.events: list[tuple[str, str]] = []
        self.records: list = []
        self._gen = discovery.watch()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for kind, record in self._gen:
            self.events.append((kind, record.id))
            self.records.append(record)

    async def wait_for(self, event: tuple[str, str], timeout_s: float = 5.0) -> float:
        async def seen() -> bool:
            if self._task.done():
                self._task.result()  # raise the watcher's error, if any
                raise AssertionError("watch ended early")
            return event in self.events
        return await wait_until(seen, timeout_s)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._gen.aclose()


@pytest.fixture
async def collect():
    """Factory of `Collector`s, stopped at teardown."""
    collectors: list[Collector] = []

    def make(discovery) -> Collector:
        c = Collector(discovery)
        collectors.append(c)
        return c

    yield make
    for c in collectors:
        await c.stop()
