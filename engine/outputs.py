"""What the engine hands back each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a sampled token and, when asked, the top alternatives."""

    token_id: int
    logprob: float
    #: (token_id, logprob) of the top N, most likely first.
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """New tokens of one request since its last output."""

    request_id: str
    new_token_ids: list[int]
    #: One entry per new token when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    #: "stop" (EOS / stop token), "length" (max_tokens or max_model_len), "abort", "error".
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    #: Prompt tokens served from the prefix cache (or pulled from a remote prefill).
    num_cached_tokens: int = 0
    #: Error text when finish_reason == "error".
    error: str | None = None
    #: On the final output of a pinned prefill (prefill workers): its KV block ids and the
    #: token count they hold, so the caller needs no round trip to the engine thread.
    kv_blocks: tuple[list[int], int] | None = None


@dataclass(frozen=True)
class EngineStats:
    """Load of one engine, for Stats RPCs, metrics and routing."""

    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int

    @property
    def kv_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


@dataclass(frozen=True)
class KvHandle:
    """Where a prefilled prompt's KV blocks wait to be pulled (prefill → decode).

    `agent` is the prefill worker's transport peer name (opaque to the engine)."""

    worker_id: str
    agent: str
    block_ids: tuple[int, ...]
    #: Prompt tokens whose KV the blocks hold.
    num_tokens: int
    #: The token the prefill sampled (already streamed to the client).
    first_token: int
    #: Its logprob entry when the request asked for logprobs.
    first_logprob: "TokenLogprob | None" = None
