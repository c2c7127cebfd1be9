"""asyncio front of the engine: the step loop runs on its own thread, requests stream back.

Lifecycle: start() loads the model (off the event loop) and starts the engine thread. The
thread drains an inbox of commands (add, abort, calls), steps while any request is
unfinished, and sleeps otherwise. Each generate() call owns an asyncio queue that the thread
feeds; when the consumer stops early (client gone, task cancelled) the request is aborted
and its KV blocks are freed at once. shutdown() aborts what is left and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .config import EngineConfig
from .engine import Engine
from .errors import EngineInputError
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

#: The engine thread's longest sleep after a step that ran nothing (a prompt held back
#: while KV pulls are in flight): a pull's end or any command wakes it sooner; the sleep
#: bounds how late a hold expiry is noticed.
IDLE_STEP_WAIT_S = 0.01


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: Engine | None = None, **engine_kwargs: Any) -> None:
        self.config = config
        self.engine = engine
        self._engine_kwargs = engine_kwargs
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats: EngineStats | None = None
        #: Pinned prefill results freed because nobody pulled them in time.
        self.num_expired_pins = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.engine is None:
            self.engine = await asyncio.to_thread(Engine, self.config, **self._engine_kwargs)
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self._stats if self._stats is not None else self.engine.stats()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests ------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        pin_timeout_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's tokens. With pin_timeout_s (prefill workers) its KV blocks stay
        pinned after it finishes, for a decode worker to pull (Engine.add_request)."""
        q = self._open(request_id, prompt_token_ids, params)
        self._send(("add", request_id, list(prompt_token_ids), params, pin_timeout_s))
        async for out in self._consume(request_id, q):
            yield out

    async def generate_remote(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_token: int,
        pull: Callable[[list[tuple[int, int]]], Awaitable[bool]],
        first_logprob: TokenLogprob | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """A request prefilled elsewhere: admit it with its first token, `await pull(plan)`,
        then stream the tokens after the first. plan: (index into the remote block ids,
        local block id) pairs still missing here — [] when this engine's prefix cache holds
        them all, None when the block pool is short and the prompt is prefilled here instead;
        `pull` is awaited in every case, so the remote side can always free its pinned
        blocks. When the pull fails (returns False or raises) the prompt is prefilled
        locally, and the request still completes."""
        q = self._open(request_id, prompt_token_ids, params)
        finished = False
        try:
            plan = await self.call(lambda e: e.add_remote_request(
                request_id, list(prompt_token_ids), params, first_token, first_logprob))
            ok = False
            try:
                ok = bool(await pull(plan))
            except Exception as exc:  # the transfer failed: prefill locally instead
                logger.warning("KV pull for %s failed (%s); prefilling locally", request_id, exc)
            finally:
                if plan is not None:
                    await asyncio.shield(self.call(lambda e: e.remote_ready(request_id, ok)))
            async for out in self._consume(request_id, q):
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._send(("abort", request_id))

    def _open(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Validate and register the output stream of a new request."""
        if not self.alive:
            raise EngineDeadError("engine is not running")
        self.engine.validate(list(prompt_token_ids), params)  # raises EngineInputError early
        if request_id in self._streams:
            raise EngineInputError(f"request id {request_id!r} is already running", "request_id")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    async def _consume(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; stopping early aborts it."""
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError("engine is not running")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._send(("call", fn, fut))
        return await fut

    def post(self, fn: Callable[[Engine], Any]) -> None:
        """Run fn(engine) on the engine thread between steps without waiting for it; an
        exception it raises is logged. For callers that must not wait out a running step."""
        if not self.alive:
            raise EngineDeadError("engine is not running")
        self._send(("call", fn, None))

    def _send(self, cmd: tuple) -> None:
        self._inbox.put(cmd)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _drain_inbox(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "add":
                _, rid, prompt, params, pin_timeout_s = cmd
                if rid not in self._streams:
                    continue  # consumer already gone
                try:
                    eng.add_request(rid, prompt, params, pin_timeout_s=pin_timeout_s)
                except Exception as exc:
                    self._deliver(rid, exc)
            elif kind == "abort":
                out = eng.abort(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)
            elif kind == "call":
                _, fn, fut = cmd
                try:
                    result = fn(eng)
                except Exception as exc:
                    if fut is None:
                        logger.exception("posted engine call failed")
                    else:
                        fut.get_loop().call_soon_threadsafe(_set_exception, fut, exc)
                else:
                    if fut is not None:
                        fut.get_loop().call_soon_threadsafe(_set_result, fut, result)

    def _flush_events(self) -> None:
        """Hand this step's KV events (block pool changes) to the sink's consumer."""
        sink = self.engine.pool.event_sink
        flush = getattr(sink, "flush", None)
        if flush is not None:
            try:
                flush()
            except Exception:  # noqa: BLE001 - events are advisory; never stop the loop
                logger.exception("KV event flush failed")

    def _run(self) -> None:
        eng = self.engine
        if self.config.num_threads is not None:
            import torch

            torch.set_num_threads(self.config.num_threads)
        while not self._stopping:
            self._drain_inbox()
            if eng.scheduler.pinned:
                expired = eng.expire_pins()
                if expired:
                    self.num_expired_pins += len(expired)
                    logger.warning("freed %d pinned prefills nobody pulled: %s",
                                   len(expired), expired)
            if not eng.has_unfinished():
                self._stats = eng.stats()
                self._flush_events()  # aborts and expiries change the pool too
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except Exception:  # pragma: no cover - Engine.step already isolates batch failures
                logger.exception("engine step raised")
                outputs = []
            self._stats = eng.stats()  # before delivering: a consumer sees fresh stats
            self._flush_events()
            for out in outputs:
                self._deliver(out.request_id, out)
            if eng.last_step_idle:  # held prompts only: wait for a pull to end, not spin
                self._wake.wait(IDLE_STEP_WAIT_S)
                self._wake.clear()
        for rid in list(eng.scheduler.requests):
            out = eng.abort(rid)
            if out is not None:
                self._deliver(rid, out)
        self._stats = eng.stats()


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
