"""OpenAI response bodies from choice events: whole responses, SSE chunk streams, logprobs
and usage. Chat streams send the role first, then content deltas and finish reasons, a
usage chunk when asked, then `[DONE]`; an error after the first chunk becomes an SSE error
event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.generation import ChoiceEvent
from splitserve.frontend.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.frontend.serving import Job, RequestTracker, ServingState, status_of
from splitserve.frontend.sse import DONE, sse_event
from splitserve.frontend.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


# -- logprobs formatting --------------------------------------------------------------------
def chat_logprobs(tok: Tokenizer, entries: list[Any], top_n: int) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        out.append({
            "token": tok.token_text(e.token_id),
            "logprob": e.logprob,
            "bytes": list(tok.token_bytes(e.token_id)),
            "top_logprobs": [
                {"token": tok.token_text(t.token_id), "logprob": t.logprob,
                 "bytes": list(tok.token_bytes(t.token_id))}
                for t in list(e.top)[:top_n]
            ],
        })
    return out


class CompletionLogprobs:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tok: Tokenizer, top_n: int) -> None:
        self.tok = tok
        self.top_n = top_n
        self.offset = 0

    def format(self, entries: list[Any]) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            text = self.tok.token_text(e.token_id)
            tokens.append(text)
            lps.append(e.logprob)
            top: dict[str, float] = {}
            for t in list(e.top)[: self.top_n]:
                top.setdefault(self.tok.token_text(t.token_id), t.logprob)
            tops.append(top)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k].extend(p[k])
    return out


# -- usage ---------------------------------------------------------------------------------
class Usage:
    def __init__(self, job: Job) -> None:
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self.n = job.n
        self.completion_tokens = 0
        self._cached: dict[int, int] = {}

    def on_event(self, ev: ChoiceEvent) -> None:
        self.completion_tokens += len(ev.token_ids)
        prompt_idx = ev.index // self.n
        self._cached[prompt_idx] = max(self._cached.get(prompt_idx, 0), ev.num_cached_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached.values())},
        }


# -- whole responses -------------------------------------------------------------------------
async def collect_chat(state: ServingState, job: Job, req: ChatCompletionRequest,
                       events: AsyncIterator[ChoiceEvent], tracker: RequestTracker) -> dict[str, Any]:
    total = len(job.prompts) * job.n
    texts: list[list[str]] = [[] for _ in range(total)]
    lps: list[list[dict[str, Any]]] = [[] for _ in range(total)]
    finish: list[str | None] = [None] * total
    usage = Usage(job)
    top_n = req.top_logprobs or 0
    async for ev in events:
        tracker.on_event(ev)
        usage.on_event(ev)
        texts[ev.index].append(ev.text)
        if req.logprobs and ev.logprobs:
            lps[ev.index].extend(chat_logprobs(state.tokenizer, ev.logprobs, top_n))
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts[i])},
                "logprobs": {"content": lps[i]} if req.logprobs else None,
                "finish_reason": finish[i],
            }
            for i in range(total)
        ],
        "usage": usage.to_dict(),
    }


async def collect_completion(state: ServingState, job: Job, req: CompletionRequest,
                             events: AsyncIterator[ChoiceEvent], tracker: RequestTracker) -> dict[str, Any]:
    total = len(job.prompts) * job.n
    texts: list[list[str]] = [[] for _ in range(total)]
    formatters = [CompletionLogprobs(state.tokenizer, req.logprobs or 0) for _ in range(total)]
    lps: list[list[dict[str, Any]]] = [[] for _ in range(total)]
    finish: list[str | None] = [None] * total
    usage = Usage(job)
    async for ev in events:
        tracker.on_event(ev)
        usage.on_event(ev)
        texts[ev.index].append(ev.text)
        if req.logprobs is not None and ev.logprobs:
            lps[ev.index].append(formatters[ev.index].format(ev.logprobs))
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return {
        "id": job.request_id,
        "object": "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": merge_completion_logprobs(lps[i]) if req.logprobs is not None else None,
                "finish_reason": finish[i],
            }
            for i in range(total)
        ],
        "usage": usage.to_dict(),
    }


# -- streamed responses -----------------------------------------------------------------------
async def _stream(
    job: Job,
    first: ChoiceEvent | None,
    events: AsyncIterator[ChoiceEvent],
    tracker: RequestTracker,
    base: dict[str, Any],
    include_usage: bool,
    preamble: list[bytes],
    render: Any,
) -> AsyncIterator[bytes]:
    """The SSE body shared by chat and completions; `render(ev)` -> a choice dict or None."""
    usage = Usage(job)
    if include_usage:
        base = {**base, "usage": None}
    status: str | None = None
    try:
        for b in preamble:
            yield b
        ev = first
        while ev is not None:
            tracker.on_event(ev)
            usage.on_event(ev)
            choice = render(ev)
            if choice is not None:
                yield sse_event({**base, "choices": [choice]})
            ev = await anext(events, None)
        if include_usage:
            yield sse_event({**base, "choices": [], "usage": usage.to_dict()})
        yield DONE
        status = "success"
    except OpenAIError as exc:
        status = status_of(exc)
        yield sse_event(exc.body())
        yield DONE
    except Exception as exc:  # noqa: BLE001 - reported to the client, then logged
        status = "error"
        logger.exception("stream %s failed", job.request_id)
        yield sse_event(OpenAIError(500, f"internal error: {exc}").body())
        yield DONE
    finally:
        await events.aclose()
        # No status: the stream was closed early (client gone).
        tracker.finish(status or "aborted")


def stream_chat(state: ServingState, job: Job, req: ChatCompletionRequest,
                first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent],
                tracker: RequestTracker) -> AsyncIterator[bytes]:
    top_n = req.top_logprobs or 0
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created,
            "model": job.model}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    role = {**base, "usage": None} if include_usage else base
    preamble = [
        sse_event({**role, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
        for i in range(len(job.prompts) * job.n)
    ]

    def render(ev: ChoiceEvent) -> dict[str, Any] | None:
        logprobs = None
        if req.logprobs and ev.logprobs:
            logprobs = {"content": chat_logprobs(state.tokenizer, ev.logprobs, top_n)}
        if not (ev.text or logprobs is not None or ev.finish_reason):
            return None
        return {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                "logprobs": logprobs, "finish_reason": ev.finish_reason}

    return _stream(job, first, events, tracker, base, include_usage, preamble, render)


def stream_completion(state: ServingState, job: Job, req: CompletionRequest,
                      first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent],
                      tracker: RequestTracker) -> AsyncIterator[bytes]:
    formatters = [CompletionLogprobs(state.tokenizer, req.logprobs or 0)
                  for _ in range(len(job.prompts) * job.n)]
    base = {"id": job.request_id, "object": "text_completion", "created": job.created,
            "model": job.model}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def render(ev: ChoiceEvent) -> dict[str, Any] | None:
        logprobs = None
        if req.logprobs is not None and ev.logprobs:
            logprobs = formatters[ev.index].format(ev.logprobs)
        if not (ev.text or logprobs is not None or ev.finish_reason):
            return None
        return {"index": ev.index, "text": ev.text, "logprobs": logprobs,
                "finish_reason": ev.finish_reason}

    return _stream(job, first, events, tracker, base, include_usage, [], render)
