"""From token ids to text events: one worker call per choice, detokenized, stop strings applied.

Lifecycle of one choice: pick a worker (503 if none; one retry on another worker if the
first is unreachable before answering), open a Generate stream, detokenize each batch of
tokens, run the stop-string matcher and yield `ChoiceEvent`s; the last one carries the
finish reason. Closing the iterator early (stop string matched, client gone, another choice
failed) cancels the gRPC call, which aborts the request on the worker and frees its blocks.
`merge_choices` runs the n choices of a request concurrently and interleaves their events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.frontend.detokenizer import IncrementalDetokenizer
from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.stop import StopStringMatcher
from splitserve.frontend.tokenizer import Tokenizer
from splitserve.frontend.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


@dataclass
class ChoiceEvent:
    """New output of one choice."""

    index: int
    text: str
    #: Token ids that arrived with this event (including ones cut by a stop string).
    token_ids: list[int]
    #: proto TokenLogprob entries for token_ids (empty unless logprobs were asked for).
    logprobs: list[Any] = field(default_factory=list)
    #: "stop" | "length" on the last event of the choice, else None.
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    #: time.perf_counter() when the tokens arrived.
    arrival: float = 0.0


class WorkerRequestError(OpenAIError):
    """A worker refused or failed a request."""


async def worker_stream(
    pool: WorkerPool, request: Any, *, retry_after_s: int = 1, disagg: Any = None,
    metrics: Any = None,
) -> AsyncIterator[Any]:
    """GenerateResponses of one request; closing it cancels the call. With `disagg` (a
    DisaggConfig) a long prompt is prefilled on a prefill worker first: its first token
    is yielded at once, then the decode worker continues from the pulled KV blocks. The
    pool hears when the request ends, however it ends (the KV router's load view)."""
    stream = _worker_stream(pool, request, retry_after_s=retry_after_s, disagg=disagg,
                            metrics=metrics)
    try:
        async with contextlib.aclosing(stream):
            async for resp in stream:
                yield resp
    finally:
        pool.request_finished(request.request_id)


async def _worker_stream(
    pool: WorkerPool, request: Any, *, retry_after_s: int = 1, disagg: Any = None,
    metrics: Any = None,
) -> AsyncIterator[Any]:
    local = False  # prefilled by the decode worker in disaggregated mode
    if disagg is not None and pool.workers("prefill", healthy_only=True):
        from splitserve.frontend.disagg import remote_prefill

        pre = await remote_prefill(pool, request, disagg, metrics)
        if pre is not None:
            yield pre.first
            if pre.first.finished:
                return
            remote = type(request)()
            remote.CopyFrom(request)
            remote.kv_handle.CopyFrom(pre.kv_handle)
            request = remote
        else:
            local = True
            pool.local_prefills += 1
    try:
        async with contextlib.aclosing(_decode_stream(pool, request, retry_after_s)) as stream:
            async for resp in stream:
                if local:
                    local = False
                    pool.local_prefills -= 1
                yield resp
    finally:
        if local:
            pool.local_prefills -= 1


async def _decode_stream(pool: WorkerPool, request: Any, retry_after_s: int) -> AsyncIterator[Any]:
    """The decode worker's GenerateResponses for `request` (one retry elsewhere when the
    first worker is unavailable before its first token)."""
    import grpc

    from splitserve.runtime.grpc_util import param_from_error

    tried: list[str] = []
    while True:
        worker = await pool.pick_async("decode", request.prompt_token_ids, exclude=tried,
                                       retry_after_s=retry_after_s,
                                       request_id=request.request_id,
                                       remote_kv=request.HasField("kv_handle"))
        tried.append(worker.worker_id)
        worker.in_flight += 1
        call = worker.generate(request)
        got_any = False
        done = False
        try:
            async for resp in call:
                if not got_any:
                    pool.request_first_token(request.request_id)
                got_any = True
                if resp.finished:
                    done = True
                yield resp
                if done:
                    return
            done = True
            return
        except grpc.aio.AioRpcError as exc:
            done = True
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise WorkerRequestError(400, exc.details() or "invalid request",
                                         param=param_from_error(exc)) from None
            if code == grpc.StatusCode.UNAVAILABLE and not got_any:
                pool.mark_failed(worker.worker_id, exc.details() or "unavailable")
                if len(tried) < 2 and pool.workers("decode", healthy_only=True):
                    pool.request_finished(request.request_id)  # drop it from that worker's load
                    logger.warning("worker %s unavailable; retrying %s elsewhere",
                                   worker.worker_id, request.request_id)
                    continue
                raise WorkerRequestError(
                    503, f"worker {worker.worker_id} is unavailable: {exc.details()}",
                    code="worker_unavailable", headers={"Retry-After": str(retry_after_s)},
                ) from None
            raise WorkerRequestError(
                500 if code != grpc.StatusCode.UNAVAILABLE else 503,
                f"worker {worker.worker_id} failed the request: {code.name}: {exc.details()}",
                code="worker_error",
            ) from None
        finally:
            worker.in_flight -= 1
            if not done:
                call.cancel()


async def run_choice(
    pool: WorkerPool,
    tokenizer: Tokenizer,
    index: int,
    request: Any,
    stop: Sequence[str],
    *,
    retry_after_s: int = 1,
    disagg: Any = None,
    metrics: Any = None,
) -> AsyncIterator[ChoiceEvent]:
    """The events of one choice (one worker request), ending with a finish reason."""
    detok = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(stop)
    prompt_tokens = cached_tokens = 0
    stream = worker_stream(pool, request, retry_after_s=retry_after_s, disagg=disagg,
                           metrics=metrics)
    async with contextlib.aclosing(stream):
        async for resp in stream:
            now = time.perf_counter()
            if resp.num_prompt_tokens and not prompt_tokens:
                # The first answer counts (a decode worker after a remote prefill reports
                # the pulled prompt as cached).
                prompt_tokens = resp.num_prompt_tokens
                cached_tokens = resp.num_cached_tokens
            ids = list(resp.token_ids)
            text = detok.add(ids)
            if resp.finished:
                if resp.finish_reason == "error":
                    raise WorkerRequestError(500, f"the worker failed the request: {resp.error}",
                                             code="worker_error")
                if resp.finish_reason == "abort":
                    raise WorkerRequestError(503, "the worker aborted the request",
                                             code="worker_aborted")
                text += detok.flush()
            out, matched = matcher.feed(text)
            finish = None
            if matched:
                finish = "stop"
            elif resp.finished:
                out += matcher.flush()
                finish = "length" if resp.finish_reason == "length" else "stop"
            yield ChoiceEvent(
                index=index, text=out, token_ids=ids, logprobs=list(resp.logprobs),
                finish_reason=finish, num_prompt_tokens=prompt_tokens,
                num_cached_tokens=cached_tokens, arrival=now,
            )
            if finish is not None:
                return  # leaving the `async with` cancels the call if it is still open
    raise WorkerRequestError(500, "the worker stream ended without a finished message",
                             code="worker_error")


async def merge_choices(streams: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Interleave the events of several choices; the first error cancels the others."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for ev in only:
                yield ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(stream: AsyncIterator[ChoiceEvent]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for ev in stream:
                    await queue.put(ev)
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(exc)
        finally:
            queue.put_nowait(done_marker)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
