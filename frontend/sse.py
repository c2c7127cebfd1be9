"""Server-sent events and client-disconnect handling, independent of the ASGI server's version.

Starlette's StreamingResponse notices a disconnect only on the next write (ASGI >= 2.4) and
never closes the body iterator itself; we need the worker request aborted as soon as the
client goes away, so these helpers watch `http.disconnect` themselves and close the
iterator (which cancels the gRPC call) the moment it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client disconnects (the request body must be fully read already)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def run_until_disconnect(receive: Callable[[], Awaitable[dict]], coro: Awaitable[T]) -> T:
    """Await `coro`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
        return task.result()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not task.done():
            task.cancel()


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


class SSEResponse(Response):
    """Streams `events` (bytes, already framed) and closes it on disconnect or when done.

    `on_disconnect` is called (once) when the client went away before the end.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_disconnect: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # No super().__init__: it would declare Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        all_headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **{k.lower(): v for k, v in (headers or {}).items()},
        }
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in all_headers.items()]
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await producer
                if self.on_disconnect is not None:
                    self.on_disconnect()
            else:
                exc = producer.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
                if exc is not None and self.on_disconnect is not None:
                    self.on_disconnect()
        finally:
            for t in (producer, watcher):
                t.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)

    async def _produce(self, send) -> None:
        events = self.events
        try:
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
