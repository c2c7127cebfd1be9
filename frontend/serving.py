"""Chat and text completions: request -> prompt token ids + per-choice sampling params ->
worker calls -> OpenAI responses (whole or streamed as SSE chunks).

Lifecycle of one request: validate (unsupported fields, model name), tokenize (chat template
for chat), check the context limit, build one worker request per choice (n per prompt, seeds
derived from `seed`), then either collect every choice's events into one response or stream
them as chunks (role first, content deltas, finish reasons, usage when asked, `[DONE]`).
Errors before the first token are HTTP errors; later ones become an SSE error event.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.errors import EngineInputError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.frontend.config import FrontendConfig
from splitserve.frontend.errors import OpenAIError, invalid
from splitserve.frontend.generation import ChoiceEvent, merge_choices, run_choice
from splitserve.frontend.metrics import FrontendMetrics
from splitserve.frontend.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.frontend.sse import DONE, sse_event
from splitserve.frontend.tokenizer import Tokenizer
from splitserve.frontend.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


def derive_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the seed itself for choice 0, a hash of (seed, index) after."""
    if seed is None or index == 0:
        return seed
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF


@dataclass
class ServingState:
    """What the handlers share; one per app."""

    config: FrontendConfig
    pool: WorkerPool
    tokenizer: Tokenizer
    metrics: FrontendMetrics
    #: Names clients may use in `model`.
    model_names: tuple[str, ...]
    #: The model's own context limit (fallback when neither config nor workers say).
    model_max_len: int
    created: int = field(default_factory=lambda: int(time.time()))

    def max_model_len(self) -> int:
        return self.config.max_model_len or self.pool.max_model_len() or self.model_max_len

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            raise OpenAIError(
                404, f"The model '{model}' does not exist; this server serves "
                f"{', '.join(repr(n) for n in self.model_names)}",
                param="model", code="model_not_found",
            )
        return model


# -- tracking (metrics) ---------------------------------------------------------------------
class RequestTracker:
    """Per-request metrics: TTFT, ITL, e2e, token counts, outcome."""

    def __init__(self, metrics: FrontendMetrics, start: float) -> None:
        self.m = metrics
        self.start = start
        self.first: float | None = None
        self._last: dict[int, float] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self._done = False
        metrics.in_flight.inc()

    def on_event(self, ev: ChoiceEvent) -> None:
        n = len(ev.token_ids)
        if not n:
            return
        self.output_tokens += n
        if self.first is None:
            self.first = ev.arrival
            self.m.ttft.observe(max(0.0, ev.arrival - self.start))
        last = self._last.get(ev.index)
        if last is not None:
            gap = max(0.0, ev.arrival - last) / n
            for _ in range(n):
                self.m.itl.observe(gap)
        self._last[ev.index] = ev.arrival

    def finish(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        self.m.in_flight.dec()
        self.m.requests.labels(status=status).inc()
        if status == "success":
            self.m.e2e.observe(time.perf_counter() - self.start)
            self.m.input_tokens.observe(self.input_tokens)
            self.m.output_tokens.observe(self.output_tokens)


def status_of(exc: BaseException) -> str:
    if isinstance(exc, OpenAIError):
        if exc.status == 503:
            return "unavailable"
        return "invalid" if exc.status < 500 else "error"
    return "error"


# -- preparation ----------------------------------------------------------------------------
@dataclass
class Job:
    """A validated request, ready to send: prompts and one params per choice."""

    request_id: str
    model: str
    prompts: list[list[int]]
    #: params[p][i]: choice i of prompt p.
    params: list[list[SamplingParams]]
    stop: list[str]
    n: int
    created: int = field(default_factory=lambda: int(time.time()))

    def worker_requests(self) -> list[tuple[int, Any]]:
        """(choice index, GenerateRequest) for every choice, index = p * n + i."""
        from splitserve.proto import worker_pb2
        from splitserve.runtime.grpc_util import sampling_params_to_proto

        out = []
        for p, prompt in enumerate(self.prompts):
            for i, sp in enumerate(self.params[p]):
                idx = p * self.n + i
                out.append((idx, worker_pb2.GenerateRequest(
                    request_id=f"{self.request_id}-{idx}",
                    prompt_token_ids=prompt,
                    sampling_params=sampling_params_to_proto(sp),
                )))
        return out


def build_params(
    req: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    max_len: int,
    *,
    requested_max_tokens: int | None,
    max_tokens_param: str,
    prompt_param: str,
    num_logprobs: int | None,
) -> list[SamplingParams]:
    if prompt_len == 0:
        raise invalid("the prompt is empty", prompt_param)
    if prompt_len >= max_len:
        raise invalid(
            f"This model's maximum context length is {max_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the prompt.",
            prompt_param, code="context_length_exceeded",
        )
    if requested_max_tokens is None:
        max_tokens = max_len - prompt_len
    elif prompt_len + requested_max_tokens > max_len:
        raise invalid(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_len + requested_max_tokens} tokens ({prompt_len} in the prompt, "
            f"{requested_max_tokens} for the completion). Please reduce the length of the "
            "prompt or the completion.",
            max_tokens_param, code="context_length_exceeded",
        )
    else:
        max_tokens = requested_max_tokens
    out = []
    for i in range(req.n):
        try:
            out.append(SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                seed=derive_seed(req.seed, i),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=num_logprobs,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
            ))
        except EngineInputError as exc:
            raise invalid(str(exc), exc.param) from None
    return out


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    msgs = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        msgs.append(d)
    return msgs


def prepare_chat(state: ServingState, req: ChatCompletionRequest) -> Job:
    req.check_unsupported()
    model = state.check_model(req.model)
    if not state.tokenizer.has_chat_template:
        raise invalid("this model has no chat template; use /v1/completions", "messages")
    try:
        prompt = state.tokenizer.encode_chat(_chat_messages(req))
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise invalid(f"cannot apply the chat template: {exc}", "messages") from None
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = build_params(
        req, len(prompt), state.max_model_len(), requested_max_tokens=req.requested_max_tokens,
        max_tokens_param=max_param, prompt_param="messages", num_logprobs=req.num_logprobs,
    )
    return Job(f"chatcmpl-{uuid.uuid4().hex}", model, [prompt], [params], req.stop_list(), req.n)


def prepare_completion(state: ServingState, req: CompletionRequest) -> Job:
    req.check_unsupported()
    model = state.check_model(req.model)
    prompts: list[list[int]] = []
    vocab = state.tokenizer.vocab_size
    for item in req.prompts():
        if isinstance(item, str):
            prompts.append(state.tokenizer.encode(item, add_special_tokens=True))
        else:
            bad = [t for t in item if not (0 <= t < vocab)]
            if bad:
                raise invalid(f"token id {bad[0]} is out of range [0, {vocab})", "prompt")
            prompts.append(list(item))
    if len(prompts) * req.n > state.config.max_choices:
        raise invalid(
            f"{len(prompts)} prompts × n={req.n} exceeds {state.config.max_choices} choices", "n"
        )
    max_len = state.max_model_len()
    params = [
        build_params(req, len(p), max_len, requested_max_tokens=req.max_tokens,
                     max_tokens_param="max_tokens", prompt_param="prompt",
                     num_logprobs=req.logprobs)
        for p in prompts
    ]
    return Job(f"cmpl-{uuid.uuid4().hex}", model, prompts, params, req.stop_list(), req.n)


def start_events(state: ServingState, job: Job) -> AsyncIterator[ChoiceEvent]:
    streams = [
        run_choice(state.pool, state.tokenizer, idx, wreq, job.stop,
                   retry_after_s=state.config.retry_after_s)
        for idx, wreq in job.worker_requests()
    ]
    return merge_choices(streams)


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
