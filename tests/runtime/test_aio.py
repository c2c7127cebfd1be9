"""runtime/aio.py: the event wait the polling loops (NIXL notices, discovery keep-alives)
are cancelled out of at shutdown."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.runtime.aio import wait_event


async def _poll_forever(event: asyncio.Event) -> None:
    """The shape of the transport's notification loop: wait, clear, wait again."""
    while True:
        if await wait_event(event, 10.0):
            event.clear()


@pytest.mark.parametrize("yields", [0, 1, 2, 3])
async def test_a_cancel_that_meets_a_set_event_still_ends_the_loop(yields):
    """asyncio.wait_for(event.wait(), t) on Python 3.11 returns normally when the event is
    set in the same loop iteration as the cancel (0 to 2 yields apart, measured), and the
    loop polls on after its stop; wait_event must not."""
    event = asyncio.Event()
    task = asyncio.create_task(_poll_forever(event))
    await asyncio.sleep(0.01)  # parked in its wait
    event.set()
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=2.0)
    try:
        assert done and task.cancelled(), "the cancel was swallowed: the loop went on polling"
    finally:
        task.cancel()
        await asyncio.wait((task,))


async def test_wait_event_reports_set_and_timeout_and_leaves_no_task():
    event = asyncio.Event()
    before = len(asyncio.all_tasks())
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True
    await asyncio.sleep(0)  # the cancelled inner waits finish
    assert len(asyncio.all_tasks()) == before
