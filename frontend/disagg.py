"""Conditional disaggregation: whether a request's prompt is prefilled by a prefill worker
(then its KV blocks move to a decode worker) or by the decode worker itself.

Remote prefill is worth its extra hop and KV transfer only for long prompts: a short
prompt's prefill fits in one engine step next to the decode batch, while a long one would
stall every running request's next token for its whole prefill (on this 2-core CPU a
1,024-token prefill is about a second). So a request goes remote when its uncached prompt
tokens exceed `max_local_prefill_tokens` and some prefill worker's queue is under
`max_prefill_queue`; otherwise, or when the prefill worker fails, the decode worker
prefills locally and the request still succeeds (a full queue spills onto the decode
workers only while fewer of their prefills are pending than there are decode workers;
past that the prompt queues at the prefill pool after all). `max_local_prefill_tokens` 0 forces
remote prefill whenever a prefill worker is healthy, however long its queue: a deployment
that asks for it wants decode workers that never prefill (their ITL untouched), and the
queue shows up as TTFT instead.

A decode worker of `splitserve serve --prefill-workers N` runs the prompts it gets in its
idle time: a prompt waits for a step without decodes or KV pulls and runs in small chunks
(the engine flags in runtime/serve_cli.DISAGG_DECODE_DEFAULTS, engine/scheduler.py), so a
full prefill queue spills onto the decode worker's spare cycles instead of stalling its
running requests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.worker_pool import WorkerClient, WorkerPool

logger = logging.getLogger(__name__)

#: Default of `--max-local-prefill-tokens`. From the shipped profile of this CPU
#: (planner/profiles/smollm2-135m-cpu.json, 1 thread): a 512-token prefill takes ~0.6 s,
#: i.e. it stalls every co-scheduled decode for ~60 decode steps of ~10 ms, while the remote
#: path costs one extra RPC plus a KV pull of ~10 ms (bench kv-transfer); 128 tokens
#: (~0.15 s) is cheap enough to prefill in place. On GPUs, where prefill is ~100x faster, a
#: larger value is right.
DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 512


@dataclass(frozen=True)
class DisaggConfig:
    #: Prompts with more uncached tokens than this are prefilled remotely when a prefill
    #: worker is free; 0: remote whenever a prefill worker exists.
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    #: A prefill worker whose queue (waiting + in flight from here) reaches this is full
    #: (not applied when max_local_prefill_tokens is 0). 2: one prompt running and one
    #: waiting (~2 s on this CPU's one prefill thread) is when an idle decode worker gets
    #: the next one sooner; `bench disagg` at 0.46 rps: SLO attainment 0.90 with 2.
    max_prefill_queue: int = 2
    #: Seconds a Prefill call may take.
    prefill_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError("max_local_prefill_tokens must be >= 0")
        if self.max_prefill_queue < 1:
            raise ValueError("max_prefill_queue must be >= 1")
        if self.prefill_timeout_s <= 0:
            raise ValueError("prefill_timeout_s must be > 0")


def prefill_queue(w: WorkerClient) -> int:
    waiting = int(w.stats.num_waiting) if w.stats is not None else 0
    return max(waiting, w.in_flight)


async def choose_prefill(pool: WorkerPool, prompt: Sequence[int], config: DisaggConfig,
                         request_id: str | None = None) -> WorkerClient | None:
    """The prefill worker for this prompt, or None to prefill on the decode worker (also
    when the pool's selector finds every prefill worker busy)."""
    workers = pool.workers("prefill", healthy_only=True)
    if not workers:
        return None
    if (config.max_local_prefill_tokens
            and await pool.uncached_tokens_async(prompt) <= config.max_local_prefill_tokens):
        return None
    full = []
    if config.max_local_prefill_tokens:  # 0 forces remote: a full queue waits its turn
        full = [w.worker_id for w in workers if prefill_queue(w) >= config.max_prefill_queue]
        if len(full) == len(workers):
            if pool.local_prefills < len(pool.workers("decode", healthy_only=True)):
                return None  # spill: a decode worker prefills it in its idle time
            full = []  # each decode worker has one already: queue at the prefill pool
    try:
        return await pool.pick_async("prefill", prompt, exclude=full, request_id=request_id)
    except NoWorkerAvailable:
        return None


async def remote_prefill(pool: WorkerPool, request: Any, config: DisaggConfig,
                         metrics: Any) -> Any | None:
    """Run the prompt on a prefill worker: its PrefillResponse, or None to prefill locally
    (no worker fits, or the chosen one failed — counted in the fallback metric)."""
    import grpc

    from splitserve.frontend.generation import WorkerRequestError
    from splitserve.runtime.grpc_util import param_from_error

    worker = await choose_prefill(pool, request.prompt_token_ids, config, request.request_id)
    if metrics is not None:
        metrics.prefill_decisions.labels(kind="local" if worker is None else "remote").inc()
    if worker is None:
        return None
    worker.in_flight += 1
    try:
        return await worker.stub.Prefill(request, timeout=config.prefill_timeout_s)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise WorkerRequestError(400, exc.details() or "invalid request",
                                     param=param_from_error(exc)) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            pool.mark_failed(worker.worker_id, exc.details() or code.name)
        logger.warning("prefill worker %s failed %s (%s: %s); prefilling on the decode worker",
                       worker.worker_id, request.request_id, code.name, exc.details())
        if metrics is not None:
            metrics.prefill_fallbacks.labels(reason=code.name.lower()).inc()
        return None
    finally:
        worker.in_flight -= 1
        pool.request_first_token(request.request_id)  # the prefill worker's part is over


__all__ = ["DisaggConfig", "DEFAULT_MAX_LOCAL_PREFILL_TOKENS", "choose_prefill",
           "remote_prefill"]
