"""Chat and text completions: request -> prompt token ids + per-choice sampling params ->
worker calls (the events of every choice).

Lifecycle of one request: validate (unsupported fields, model name), tokenize (chat template
for chat), check the context limit, build one worker request per choice (n per prompt, seeds
derived from `seed`), start the choices' event streams; `frontend.responses` turns the
events into a whole response or an SSE stream. Errors before the first token are HTTP
errors.
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
                   retry_after_s=state.config.retry_after_s, disagg=state.config.disagg,
                   metrics=state.metrics)
        for idx, wreq in job.worker_requests()
    ]
    return merge_choices(streams)
