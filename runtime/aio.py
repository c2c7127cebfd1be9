"""asyncio plumbing shared by the frontend, the router and the workers."""

from __future__ import annotations

import asyncio
from typing import Any


def spawn_tracked(tasks: set[asyncio.Task], coro: Any, name: str) -> asyncio.Task:
    """A task on the running loop, kept in `tasks` until it is done (to cancel or await at stop)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `event`; True if it is set.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that returns normally,
    swallowing a cancellation, when the event is set just before its task is cancelled
    (the inner wait is done by the time the CancelledError reaches wait_for), and a
    polling loop built on it then outlives the cancel meant to end it. asyncio.wait
    never swallows one."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
