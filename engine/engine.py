"""The step loop: add requests, step (schedule → execute → update), abort.

A request enters with add_request (validated here: a bad one raises EngineInputError and
nothing else is touched), runs through as many steps as it needs, and leaves finished or
aborted with its blocks freed at once. A step that fails fails only the requests it ran;
the loop goes on.
"""

from __future__ import annotations

import logging

import torch

from .block_pool import BlockPool, KvEventSink
from .config import EngineConfig, ModelConfig
from .errors import EngineInputError
from .kv_cache_manager import KVCacheManager
from .model_runner import ModelRunner, keep_quantized
from .outputs import EngineStats, RequestOutput
from .request import Request, RequestStatus
from .sampler import exponential_noise
from .sampling_params import SamplingParams
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        event_sink: KvEventSink | None = None,
    ) -> None:
        self.config = config
        #: Whether the last step() ran nothing (e.g. a prompt held back while a KV pull is
        #: in flight): its caller may wait for an event instead of stepping again at once.
        self.last_step_idle = False
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if model_config is None or state_dict is None:
            from .model_loader import load_model, resolve_model

            model_config, state_dict = load_model(resolve_model(config.model), torch.float32,
                                                  progress=config.progress,
                                                  keep_quantized=keep_quantized(config))
        self.model_config = model_config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.runner = ModelRunner(config, model_config, state_dict, self.max_model_len)
        del state_dict
        self.pool = BlockPool(self.runner.num_blocks, config.enable_prefix_caching, event_sink)
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)

    # -- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise EngineInputError("prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise EngineInputError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if n >= self.max_model_len:
            raise EngineInputError(
                f"prompt has {n} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt + at least one new token)",
                "prompt",
            )
        if n + params.max_tokens > self.max_model_len:
            raise EngineInputError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum "
                f"context length of {self.max_model_len} tokens",
                "max_tokens",
            )
        need = self.kv.blocks_needed(n + params.max_tokens)
        if need > self.pool.num_blocks:
            raise EngineInputError(
                f"request needs {need} KV blocks but the cache holds {self.pool.num_blocks}; "
                "shorten the prompt or max_tokens, or raise --kv-cache-memory",
                "max_tokens",
            )

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        prompt_token_ids = list(prompt_token_ids)
        self.validate(prompt_token_ids, params)
        if request_id in self.scheduler.requests or request_id in self.scheduler.pinned:
            raise EngineInputError(f"request id {request_id!r} is already running", "request_id")
        return Request(request_id, prompt_token_ids, params, self.model_config.eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    pin_timeout_s: float | None = None) -> None:
        """Queue a request. With pin_timeout_s (a prefill worker) its blocks outlive it until
        release_pinned() or the timeout, so a decode worker can pull them."""
        req = self._new_request(request_id, prompt_token_ids, params)
        if pin_timeout_s is not None:
            req.pin_on_finish = True
            req.pin_deadline = float("inf")
            req.pin_timeout_s = pin_timeout_s
        self.scheduler.add(req)

    # -- disaggregation --------------------------------------------------------------------
    def pinned_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Block ids and computed token count of a finished, pinned prefill."""
        return self.scheduler.pinned_blocks(request_id)

    def release_pinned(self, request_id: str) -> bool:
        return self.scheduler.release_pinned(request_id)

    def expire_pins(self, now: float | None = None) -> list[str]:
        """Free pinned prefills nobody pulled in time; returns their ids."""
        import time

        now = time.monotonic() if now is None else now
        expired = self.scheduler.expired_pins(now)
        for rid in expired:
            self.scheduler.release_pinned(rid)
        return expired

    def add_remote_request(self, request_id: str, prompt_token_ids: list[int],
                           params: SamplingParams, first_token: int,
                           first_logprob=None) -> list[tuple[int, int]] | None:
        """Admit a request prefilled elsewhere. Allocates blocks for its prompt, reusing the
        leading blocks this engine's prefix cache holds, and returns the pull plan: (index
        into the remote handle's block ids, local block id) for each missing block. Returns
        None when the pool is short: the request then queues for a local prefill instead.
        Call remote_ready() when the pull ends."""
        req = self._new_request(request_id, prompt_token_ids, params)
        req.append_token(first_token)
        req.num_returned_tokens = 1  # the prefill side already streamed it
        if first_logprob is not None:
            req.logprobs.append(first_logprob)
        if params.seed is not None and not params.greedy:
            # Keep the seeded stream aligned with an aggregated run: the first draw was spent
            # by the prefill worker.
            exponential_noise(self.model_config.vocab_size, req.generator)
        cached = self.kv.find_cached_prefix(req)
        n_prompt_blocks = self.kv.blocks_needed(req.num_prompt_tokens)
        cached = cached[:n_prompt_blocks]
        new_tokens = req.num_prompt_tokens - len(cached) * self.config.block_size
        if not self.kv.allocate(req, new_tokens, cached):
            self.scheduler.add(req)
            return None
        self.scheduler.add_remote(req)
        return [(i, req.blocks[i].block_id) for i in range(len(cached), n_prompt_blocks)]

    def remote_ready(self, request_id: str, ok: bool) -> bool:
        """The pull for request_id ended (ok=False: prefill it locally). False if unknown."""
        return self.scheduler.remote_ready(request_id, ok) is not None

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        return None if req is None else Scheduler.make_output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_idle = not out
        if not out:
            return []
        try:
            sampled, logprobs = self.runner.execute(out)
        except Exception as exc:  # one failing batch must not stop the loop
            logger.exception("step failed; failing its %d requests", len(out.scheduled))
            results = []
            for s in out.scheduled:
                req = s.request
                if req.status is RequestStatus.RUNNING:
                    req.error = f"internal error: {exc}"
                    self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                    results.append(Scheduler.make_output(req))
            return results
        return self.scheduler.update(out, sampled, logprobs)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_free_blocks=self.pool.num_free_blocks,
            num_total_blocks=self.pool.num_blocks,
            block_size=self.config.block_size,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion synchronously; returns each one's output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        outs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                outs[o.request_id].extend(o.new_token_ids)
        return [outs[rid] for rid in ids]
