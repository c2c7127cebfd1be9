"""Keep a WorkerPool in step with discovery (`splitserve.runtime.discovery`).

Lifecycle: `start()` opens the discovery URL and runs one task that consumes its watch —
the live records first, then every change. A "put" adds the worker to the pool (or
replaces it when its address changed) and polls its Stats at once so it can take requests
right away; a "delete" removes it. Workers of another model are left out, with a warning.
If the watch fails it is reopened after a short pause. `stop()` ends the task and closes
the discovery handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from splitserve.frontend.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


class DiscoverySync:
    """Mirrors the discovery records of `url` into `pool`."""

    def __init__(self, pool: WorkerPool, url: str, model: str | None = None,
                 retry_s: float = 1.0) -> None:
        self.pool = pool
        self.url = url
        self.model = model
        self.retry_s = retry_s
        self._disc: Any = None
        self._task: asyncio.Task | None = None
        #: Set once the first replay of live records has been applied.
        self.synced = asyncio.Event()

    async def start(self) -> None:
        from splitserve.runtime.discovery import open_discovery

        self._disc = await open_discovery(self.url)
        self._task = asyncio.create_task(self._run(), name="discovery-sync")

    async def _run(self) -> None:
        while True:
            try:
                for record in await self._disc.list():
                    await self.apply("put", record)
                self.synced.set()
                watch = self._disc.watch()
                async with contextlib.aclosing(watch):
                    async for kind, record in watch:
                        await self.apply(kind, record)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving with the workers we know
                logger.exception("discovery watch on %s failed; retrying", self.url)
            await asyncio.sleep(self.retry_s)

    async def apply(self, kind: str, record: Any) -> None:
        existing = self.pool.get(record.id)
        if kind == "delete":
            if existing is not None and existing.address == record.address:
                await self.pool.remove(record.id)
            return
        if self.model is not None and record.model != self.model:
            logger.warning("ignoring worker %s: it serves %r, this frontend %r",
                           record.id, record.model, self.model)
            return
        if existing is not None:
            if existing.address == record.address and existing.role == record.role:
                return
            await self.pool.remove(record.id)
        client = self.pool.add(record.id, record.role, record.address)
        await self.pool.refresh([client])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._disc is not None:
            await self._disc.close()
            self._disc = None
