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
