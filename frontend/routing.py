"""KV-aware routing inside the frontend: a `Router` fed by every worker's KV events, plugged
into the WorkerPool as its selector.

Lifecycle: `KvRouting(config, pool)`; `start()` (in the app's lifespan, on its loop) makes
itself the pool's selector and follows every worker the pool has, and through the pool's
`on_add` / `on_remove` hooks every worker that joins or leaves. Following a worker: a
`KvEventSubscriber` dials the worker's gRPC address (the KvEvents methods share the
Worker service's port) → hello (worker id, block size) → snapshot → event batches and load;
when the stream breaks the worker leaves the router until it reconnects. A worker without
KvEvents (UNIMPLEMENTED), or whose block size is not the router's, joins in approximate mode
instead: the router remembers where it sent each prompt for `approx_ttl_s` (and a size
mismatch is logged as an error). `stop()` ends every subscription.

Per request: the pool calls `__call__(candidates, prompt, request_id=, remote_kv=)` with the
healthy candidates of one role; `Router.select` picks among those it knows (prefill pool:
role prefill; decode pool: aggregated, or decode when the KV comes from a prefill worker)
and books the request in its load view; the pool relays `on_first_token` / `on_finished`
from the request's lifecycle (frontend/generation.py, frontend/disagg.py).
`uncached_tokens(prompt)` tells frontend/disagg.py how much of a prompt the best decode
worker would have to compute. The router finding every worker above its KV-usage or queue
limit is a 503 with Retry-After (frontend.errors.NoWorkerAvailable); candidates it does not
know yet (subscription still starting) are used only when it knows none of them (then the
pool's least-loaded choice applies, and nothing is booked). `select` is `__call__` that also
returns the router's Selection (the standalone router, router/grpc_service.py, answers with
it). With `--router-address` the frontend routes through a standalone `splitserve router`
instead (router/remote.py), which runs this same class.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.worker_pool import WorkerClient, WorkerPool, least_loaded
from splitserve.router import NoWorkerAvailable as RouterBusy
from splitserve.router import Role, Router, RouterConfig, Selection
from splitserve.router.config import MODES
from splitserve.runtime.aio import spawn_tracked
from splitserve.router.errors import BlockSizeMismatch, KvEventsUnsupported
from splitserve.router.service import KvEventSubscriber

logger = logging.getLogger(__name__)


# -- CLI ------------------------------------------------------------------------------------
def add_router_args(p: argparse.ArgumentParser, *, block_size: bool = True) -> None:
    """`--router-*` flags of the frontend (and `splitserve serve`, which passes them on;
    it sets the block size from the engine's, so `block_size=False` there)."""
    d = RouterConfig()
    g = p.add_argument_group("router")
    g.add_argument("--router-mode", choices=MODES, default=d.mode,
                   help="worker choice: kv (prefix overlap + load, default) | round-robin | "
                        "random | least-loaded")
    g.add_argument("--router-temperature", type=float, default=d.temperature,
                   help="0: cheapest worker; > 0: softmax sampling over normalized costs "
                        f"(default {d.temperature:g})")
    g.add_argument("--router-max-active-blocks-frac", type=float,
                   default=d.max_active_blocks_frac,
                   help="skip workers whose KV usage is above this fraction; all above: 503 "
                        f"(default {d.max_active_blocks_frac:g}; 1 disables)")
    g.add_argument("--router-max-queue", type=int, default=d.max_queue,
                   help="skip workers with this many requests waiting for a first token; all "
                        "such: 503 (default: no limit)")
    g.add_argument("--router-overlap-weight", type=float, default=d.overlap_weight,
                   help="weight of prompt blocks to compute against active decode blocks "
                        f"(default {d.overlap_weight:g})")
    g.add_argument("--router-seed", type=int, default=d.seed, help="router RNG seed")
    if block_size:
        g.add_argument("--router-block-size", type=int, default=d.block_size,
                       help=f"tokens per KV block; must be the workers' (default {d.block_size})")


def router_config_from_args(args: argparse.Namespace, **overrides: Any) -> RouterConfig:
    """RouterConfig from the `--router-*` flags (ValueError on a bad value)."""
    d = RouterConfig()
    kwargs: dict[str, Any] = dict(
        mode=getattr(args, "router_mode", d.mode),
        temperature=getattr(args, "router_temperature", d.temperature),
        max_active_blocks_frac=getattr(args, "router_max_active_blocks_frac",
                                       d.max_active_blocks_frac),
        max_queue=getattr(args, "router_max_queue", d.max_queue),
        overlap_weight=getattr(args, "router_overlap_weight", d.overlap_weight),
        seed=getattr(args, "router_seed", d.seed),
        block_size=getattr(args, "router_block_size", d.block_size),
    )
    kwargs.update(overrides)
    return RouterConfig(**kwargs)


def router_argv(args: argparse.Namespace, block_size: int) -> list[str]:
    """The `--router-*` flags of `args` as a frontend argv (for `splitserve serve`); flags
    missing from `args` keep the frontend's defaults."""
    cfg = router_config_from_args(args, block_size=int(block_size))
    out = ["--router-mode", cfg.mode,
           "--router-temperature", repr(cfg.temperature),
           "--router-max-active-blocks-frac", repr(cfg.max_active_blocks_frac),
           "--router-overlap-weight", repr(cfg.overlap_weight),
           "--router-block-size", str(cfg.block_size)]
    if cfg.max_queue is not None:
        out += ["--router-max-queue", str(cfg.max_queue)]
    if cfg.seed is not None:
        out += ["--router-seed", str(cfg.seed)]
    return out


# -- following workers --------------------------------------------------------------------
@dataclass
class _Followed:
    """How the router knows one pool worker."""

    client: WorkerClient
    #: The event stream (None once the worker fell back to approximate mode).
    sub: KvEventSubscriber | None = None
    #: Approximate mode: the router id (the pool's worker id).
    approx_id: str | None = None


class KvRouting:
    """The frontend's KV router and its WorkerPool plug-in; see the module docstring."""

    #: WorkerPool.pick passes request_id / remote_kv to this selector.
    takes_request_hints = True

    def __init__(self, config: RouterConfig, pool: WorkerPool,
                 subscriber_backoff_s: tuple[float, float] = (0.1, 2.0)) -> None:
        self.config = config
        self.pool = pool
        self.router = Router(config)
        self._backoff = subscriber_backoff_s
        self._followed: dict[str, _Followed] = {}
        #: Pool worker id -> the task stopping its old subscription (a re-add waits for it).
        self._stopping: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        #: pool worker id -> requests routed there / their prompt blocks already cached there.
        self.routed: dict[str, int] = {}
        self.routed_overlap_blocks: dict[str, int] = {}
        #: Picks made without the router (it knew none of the candidates yet).
        self.fallback_picks = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Become the pool's selector and follow its workers (call on the serving loop)."""
        if self._started:
            return
        self._started = True
        self.pool.selector = self
        self.pool.on_add.append(self._on_add)
        self.pool.on_remove.append(self._on_remove)
        self.pool.on_stats.append(self._on_stats)
        for client in self.pool.workers():
            self._on_add(client)

    async def stop(self) -> None:
        for hooks, cb in ((self.pool.on_add, self._on_add),
                          (self.pool.on_remove, self._on_remove),
                          (self.pool.on_stats, self._on_stats)):
            with contextlib.suppress(ValueError):
                hooks.remove(cb)
        for wid in list(self._followed):
            self._on_remove(wid)
        pending = list(self._stopping.values()) + list(self._tasks)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._stopping.clear()
        self._tasks.clear()
        self._started = False

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        return spawn_tracked(self._tasks, coro, name)

    def _on_add(self, client: WorkerClient) -> None:
        if client.worker_id in self._followed:
            return
        self._followed[client.worker_id] = _Followed(client)
        self._spawn(self._follow(client), f"kv-follow:{client.worker_id}")

    async def _follow(self, client: WorkerClient) -> None:
        wid = client.worker_id
        old = self._stopping.get(wid)
        if old is not None:  # the same id re-added (new address): let the old one leave first
            with contextlib.suppress(Exception):
                await old
        entry = self._followed.get(wid)
        if entry is None or entry.client is not client:
            return  # removed again meanwhile
        pool_name = "prefill" if client.role == "prefill" else "decode"
        sub = KvEventSubscriber(self.router, client.address, pool_name, backoff_s=self._backoff)
        entry.sub = sub
        try:
            await sub.start()  # ends on sub.stop() (cancelled) or a fatal error
        except KvEventsUnsupported:
            self._follow_approximately(entry, pool_name, "it publishes no KV events")
        except BlockSizeMismatch as exc:
            logger.error("%s; routing to %s without its KV events", exc, wid)
            self._follow_approximately(entry, pool_name, "block size mismatch")
        except asyncio.CancelledError:
            pass
        finally:
            if entry.sub is sub:
                entry.sub = None

    def _follow_approximately(self, entry: _Followed, pool_name: str, why: str) -> None:
        wid = entry.client.worker_id
        if self._followed.get(wid) is not entry:
            return
        if wid in self.router.workers():
            logger.error("cannot follow %s approximately: the router already has a worker "
                         "with that id", wid)
            return
        self.router.add_worker(wid, pool_name, block_size=self.config.block_size,
                               approximate=True)
        entry.approx_id = wid
        logger.info("routing to %s in approximate mode (%s)", wid, why)

    def _on_remove(self, worker_id: str) -> None:
        entry = self._followed.pop(worker_id, None)
        if entry is None:
            return
        if entry.approx_id is not None:
            self.router.remove_worker(entry.approx_id)
        if entry.sub is not None:
            sub, entry.sub = entry.sub, None
            self._stopping[worker_id] = self._spawn(self._stop_sub(worker_id, sub),
                                                     f"kv-unfollow:{worker_id}")

    async def _stop_sub(self, worker_id: str, sub: KvEventSubscriber) -> None:
        try:
            await sub.stop()  # its task's cleanup removes the worker from the router
        finally:
            if self._stopping.get(worker_id) is asyncio.current_task():
                del self._stopping[worker_id]

    def _on_stats(self, pool: WorkerPool) -> None:
        """Approximate workers' load comes from the pool's Stats polls (the others' on
        their event stream)."""
        for entry in self._followed.values():
            if entry.approx_id is not None and entry.client.stats is not None:
                with contextlib.suppress(Exception):
                    self.router.update_stats(entry.approx_id, entry.client.stats)

    def router_id(self, client: WorkerClient) -> str | None:
        """The id the router knows this pool worker by; None while it does not."""
        entry = self._followed.get(client.worker_id)
        if entry is None or entry.client is not client:
            return None
        if entry.approx_id is not None:
            return entry.approx_id
        sub = entry.sub
        if sub is not None and sub.ready.is_set():
            return sub.worker_id
        return None

    def worker_state(self, client: WorkerClient) -> str:
        """"events" (following its KV events) | "approximate" | "connecting"."""
        entry = self._followed.get(client.worker_id)
        if entry is not None and entry.client is client and entry.approx_id is not None:
            return "approximate"
        return "events" if self.router_id(client) is not None else "connecting"

    # -- the selector ---------------------------------------------------------------------------
    def __call__(
        self,
        candidates: Sequence[WorkerClient],
        prompt_token_ids: Sequence[int] | None,
        *,
        request_id: str | None = None,
        remote_kv: bool = False,
    ) -> WorkerClient:
        return self.select(candidates, prompt_token_ids, request_id=request_id,
                           remote_kv=remote_kv)[0]

    def select(
        self,
        candidates: Sequence[WorkerClient],
        prompt_token_ids: Sequence[int] | None,
        *,
        request_id: str | None = None,
        remote_kv: bool = False,
    ) -> tuple[WorkerClient, Selection | None]:
        """The chosen candidate and the router's Selection (None: the router knew none of
        the candidates, the pool's least-loaded choice, nothing booked)."""
        known: dict[str, WorkerClient] = {}
        for c in candidates:
            rid = self.router_id(c)
            if rid is not None:
                known[rid] = c
        if not known:
            self.fallback_picks += 1
            return least_loaded(candidates, prompt_token_ids), None
        pool_name = "prefill" if candidates[0].role == "prefill" else "decode"
        if pool_name == "prefill":
            role = Role.PREFILL
        else:
            role = Role.DECODE if remote_kv else Role.AGGREGATED
        exclude = {w for w in self.router.workers(pool_name) if w not in known}
        prompt = prompt_token_ids if prompt_token_ids is not None else ()
        try:
            try:
                sel = self.router.select(prompt, role, request_id=request_id, exclude=exclude)
            except ValueError:  # already booked on that worker (should not happen)
                logger.warning("request %s was already routed; not booking it again", request_id)
                sel = self.router.select(prompt, role, exclude=exclude)
        except RouterBusy as exc:
            raise NoWorkerAvailable(pool_name, max(1, math.ceil(exc.retry_after_s))) from None
        client = known[sel.worker_id]
        if role is not Role.PREFILL:
            self.routed[client.worker_id] = self.routed.get(client.worker_id, 0) + 1
            self.routed_overlap_blocks[client.worker_id] = (
                self.routed_overlap_blocks.get(client.worker_id, 0) + sel.overlap_blocks)
        return client, sel

    def on_first_token(self, request_id: str) -> None:
        self.router.on_first_token(request_id)

    def on_finished(self, request_id: str) -> None:
        self.router.on_finished(request_id)

    def uncached_tokens(self, prompt_token_ids: Sequence[int]) -> int:
        """Prompt tokens the decode worker holding the longest prefix would still compute."""
        decode = self.router.workers("decode")
        if not decode or not prompt_token_ids:
            return len(prompt_token_ids)
        matches = self.router.find_matches(prompt_token_ids)
        best = max((matches.get(w, 0) for w in decode), default=0)
        return max(0, len(prompt_token_ids) - best * self.config.block_size)

    # -- introspection ------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """The router's counters plus the frontend's view: for the Prometheus export."""
        m: dict[str, Any] = dict(self.router.metrics())
        m["mode"] = self.config.mode
        m["fallback_picks"] = self.fallback_picks
        m["resyncs"] = sum(e.sub.resyncs for e in self._followed.values() if e.sub is not None)
        m["workers"] = [(wid, e.client.role, self.worker_state(e.client))
                        for wid, e in self._followed.items()]
        m["routed"] = dict(self.routed)
        m["routed_overlap_blocks"] = dict(self.routed_overlap_blocks)
        return m
