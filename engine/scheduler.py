"""Continuous batching: decides which requests run this step and how many tokens each.

Each step: running requests first (a decode token each, or the next chunk of their prompt),
then waiting requests in arrival order while the token budget, the running cap and the
block pool allow. When a running request cannot get a block, the most recently admitted
running request is preempted (its blocks freed, to be recomputed later) — never a crash,
never a deadlock: add-time checks guarantee that one request alone always fits. The
scheduler never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .kv_cache_manager import KVCacheManager
from .outputs import RequestOutput
from .request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    #: Tokens computed this step, starting at position `start`.
    num_new_tokens: int
    start: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the request's known tokens, so it yields a token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class _PromptBudget:
    """The prompt tokens of one step: at most `max_prefill_tokens_per_step` for all prompt
    chunks (more than one new token) together, and while the step runs decode tokens at most
    `max_prefill_tokens_with_decodes` for the prompts that arrived less than
    `max_prefill_hold_s` ago. A KV pull in flight counts as a decode: its request decodes
    as soon as the pull ends, and a prompt chunk started meanwhile would keep it waiting a
    whole chunk."""

    def __init__(self, per_step: int | None, with_decodes: int | None = None,
                 cutoff: float = 0.0) -> None:
        self.per_step = per_step  # None: no cap
        self.with_decodes = with_decodes  # None: no cap this step
        self.cutoff = cutoff

    @classmethod
    def for_step(cls, config: EngineConfig, running, waiting, pulling) -> "_PromptBudget":
        cap = config.max_prefill_tokens_with_decodes
        if cap is not None and not (
                pulling
                or any(r.num_tokens - r.num_computed_tokens == 1 for r in running)
                or any(r.num_computed_tokens and r.num_tokens - r.num_computed_tokens == 1
                       for r in waiting)):
            cap = None  # no decodes this step
        return cls(config.max_prefill_tokens_per_step, cap,
                   time.monotonic() - config.max_prefill_hold_s)

    def _held(self, req: Request) -> bool:
        return self.with_decodes is not None and req.arrival_time > self.cutoff

    def allow(self, req: Request, wanted: int) -> int:
        """The tokens `req` may run this step of the `wanted` it has left."""
        if wanted <= 1:
            return wanted  # a decode token
        if self.per_step is not None:
            wanted = min(wanted, self.per_step)
        return min(wanted, self.with_decodes) if self._held(req) else wanted

    def took(self, req: Request, wanted: int, taken: int) -> None:
        if wanted <= 1:
            return
        if self.per_step is not None:
            self.per_step -= taken
        if self._held(req):
            self.with_decodes -= taken


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        #: Prefill results whose blocks wait for a decode worker's pull.
        self.pinned: dict[str, Request] = {}
        #: Requests whose KV is being pulled from a prefill worker.
        self.remote: dict[str, Request] = {}

    # -- bookkeeping ------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        """True while a request waits or runs (pulls in flight and pins do not count)."""
        return bool(self.waiting) or bool(self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request: drop it from the queues and free its blocks at once."""
        req.status = status
        self.requests.pop(req.request_id, None)
        self.remote.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        if req.pin_on_finish and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            req.pin_deadline = time.monotonic() + req.pin_timeout_s
            self.pinned[req.request_id] = req
        else:
            self.kv.free(req)

    def pinned_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Block ids and computed token count of a finished, pinned prefill."""
        req = self.pinned[request_id]
        n = req.num_computed_tokens
        return [b.block_id for b in req.blocks[: self.kv.blocks_needed(n)]], n

    def release_pinned(self, request_id: str) -> bool:
        """Free a prefill result's blocks (pulled, or expired). False if not pinned."""
        req = self.pinned.pop(request_id, None)
        if req is None:
            return False
        self.kv.free(req)
        return True

    def expired_pins(self, now: float) -> list[str]:
        return [rid for rid, r in self.pinned.items() if r.pin_deadline <= now]

    def add_remote(self, req: Request) -> None:
        """Track a request whose prompt KV is being pulled; it runs after remote_ready()."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[req.request_id] = req
        self.remote[req.request_id] = req

    def remote_ready(self, request_id: str, ok: bool) -> Request | None:
        """The pull ended. On success the prompt counts as computed; on failure the blocks
        go back and the prompt is prefilled locally. Either way the request queues first."""
        req = self.remote.pop(request_id, None)
        if req is None:
            return None  # aborted meanwhile
        if ok:
            req.num_computed_tokens = req.num_prompt_tokens
            req.num_cached_tokens = req.num_prompt_tokens
            self.kv.cache_full_blocks(req)
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            req.pin_on_finish = False
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        elif request_id in self.pinned:
            self.release_pinned(request_id)
        return req

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        prompts = _PromptBudget.for_step(self.config, self.running, self.waiting, self.remote)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            wanted = min(req.num_tokens - req.num_computed_tokens, budget)
            num_new = prompts.allow(req, wanted)
            if not num_new:  # a prompt chunk held back while decodes run
                i += 1
                continue
            scheduled = True
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            out.scheduled.append(ScheduledRequest(req, num_new, req.num_computed_tokens))
            prompts.took(req, wanted, num_new)
            budget -= num_new
            i += 1

        i = 0
        while (
            i < len(self.waiting)
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[i]
            # A request with computed tokens (KV pulled from a prefill worker) resumes.
            cached = self.kv.find_cached_prefix(req) if not req.num_computed_tokens else []
            num_cached = len(cached) * self.kv.block_size or req.num_computed_tokens
            wanted = req.num_tokens - num_cached
            num_new = prompts.allow(req, wanted)
            if num_new < wanted and (not num_new or not chunked):
                i += 1  # held back: the requests behind it (decodes resuming) may still run
                continue
            if num_new > budget:
                # Without chunking a prompt runs whole; one longer than the full budget
                # (possible after preemption) still runs in chunks rather than never.
                if not chunked and (out.scheduled or num_new <= self.config.max_num_batched_tokens):
                    break
                num_new = budget
            if not self.kv.allocate(req, num_new, cached):
                break
            del self.waiting[i]
            if req.num_preemptions == 0 and not req.num_cached_tokens:
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, num_cached))
            prompts.took(req, wanted, num_new)
            budget -= num_new
        return out

    def update(
        self, out: SchedulerOutput, sampled: dict[str, int], logprobs: dict | None = None
    ) -> list[RequestOutput]:
        """Advance computed tokens, append sampled tokens, finish requests that stop."""
        results: list[RequestOutput] = []
        for s in out.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = s.start + s.num_new_tokens
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_token(token)
            if logprobs and req.request_id in logprobs:
                req.logprobs.append(logprobs[req.request_id])
            status = self._check_stop(req, token)
            if status is not None:
                self.finish(req, status)
            output = self.make_output(req)
            if status is not None and req.request_id in self.pinned:
                output.kv_blocks = self.pinned_blocks(req.request_id)
            results.append(output)
        return results

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        if token in req.stop_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= req.params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def make_output(req: Request) -> RequestOutput:
        start = req.num_returned_tokens
        new = req.output_token_ids[start:]
        req.num_returned_tokens = len(req.output_token_ids)
        finished = req.status.finished
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new,
            logprobs=req.logprobs[start:] if req.params.logprobs is not None else [],
            finished=finished,
            finish_reason=req.status.value if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            error=req.error,
        )
