"""A request inside the engine and its status.

Lifecycle: WAITING (queued; or back here after preemption, to recompute) → RUNNING (its
prompt is prefilled in one or more chunks, then one token per step) → FINISHED_*. A request
whose KV cache comes from a remote prefill waits in WAITING_FOR_REMOTE_KV until the pull
lands, then runs like any other.
"""

from __future__ import annotations

import enum
import time

import torch

from .block_pool import Block
from .outputs import TokenLogprob
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """One sequence: its tokens, its blocks and how far its KV cache is computed."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = RequestStatus.WAITING
        #: Tokens whose KV is in this request's blocks.
        self.num_computed_tokens = 0
        #: Prompt tokens served from the prefix cache (first schedule only).
        self.num_cached_tokens = 0
        self.blocks: list[Block] = []
        #: Chained hashes of this request's full blocks, computed as they fill.
        self.block_hashes: list[int] = []
        #: Leading blocks already published to the prefix cache.
        self.num_published_blocks = 0
        self.arrival_time = time.monotonic()
        self.num_preemptions = 0
        self.logprobs: list[TokenLogprob] = []
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        #: Tokens already handed out in a RequestOutput.
        self.num_returned_tokens = 0
        self.error: str | None = None
        #: Prefill-only request: keep its blocks after it finishes, until released.
        self.pin_on_finish = False
        #: Monotonic deadline after which pinned blocks are freed if nobody pulled them.
        self.pin_deadline = 0.0
        self.pin_timeout_s = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})"
        )
