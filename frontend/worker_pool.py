"""The frontend's set of workers: add/remove, list by role, health, load, and the choice of one.

Lifecycle: `add()` workers (from `--worker role=host:port` flags, or from discovery through
`frontend.discovery_sync`);
`start()` polls every worker's Stats once, then every `stats_interval_s` in the background —
a worker counts as healthy after a successful poll and stops counting after a failed one
(or a failed call). `pick(role)` asks the selector for one healthy worker: least-loaded by
default; the KV-aware router (`frontend.routing`) plugs in as another selector, one that
also takes the request's id (it books the request in its load view) and hears of its first
token and its end through `request_first_token` / `request_finished`. `close()` stops
polling and closes every channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.runtime.aio import spawn_tracked

logger = logging.getLogger(__name__)

#: Worker roles the pool knows; counts() reports each, even at zero.
ROLES = ("decode", "prefill")

#: selector(candidates, prompt_token_ids) -> one of the candidates. A selector whose
#: `takes_request_hints` attribute is true is called with keywords too: request_id (str or
#: None) and remote_kv (the decode worker will pull the prompt's KV from a prefill worker).
Selector = Callable[[Sequence["WorkerClient"], "Sequence[int] | None"], "WorkerClient"]


def static_worker_id(role: str, address: str) -> str:
    """The pool id of a worker given by flag (`--decode-worker ADDR`), not by discovery."""
    return f"{role}@{address}"


class WorkerClient:
    """One worker seen from the frontend: its gRPC stub, last Stats, in-flight count."""

    def __init__(self, worker_id: str, role: str, address: str) -> None:
        self.worker_id = worker_id
        self.role = role
        self.address = address
        #: Generate calls open from this frontend right now.
        self.in_flight = 0
        #: The last StatsResponse (None before the first successful poll).
        self.stats: Any = None
        self.healthy = False
        self._channel: Any = None
        self._stub: Any = None

    @property
    def stub(self) -> Any:
        """The Worker stub; the channel is created on first use, inside the running loop."""
        if self._stub is None:
            import grpc

            from splitserve.proto import worker_pb2_grpc
            from splitserve.runtime.grpc_util import GRPC_OPTIONS

            self._channel = grpc.aio.insecure_channel(self.address, options=list(GRPC_OPTIONS))
            self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        return self._stub

    @property
    def kv_usage(self) -> float:
        s = self.stats
        if s is None or not s.num_total_blocks:
            return 0.0
        return 1.0 - s.num_free_blocks / s.num_total_blocks

    @property
    def max_model_len(self) -> int | None:
        return int(self.stats.max_model_len) if self.stats is not None and self.stats.max_model_len else None

    async def fetch_stats(self, timeout: float = 2.0) -> Any:
        from splitserve.proto import worker_pb2

        return await self.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)

    async def abort(self, request_id: str, timeout: float = 2.0) -> None:
        from splitserve.proto import worker_pb2

        await self.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=timeout)

    def generate(self, request: Any) -> Any:
        """Start a Generate call (an async iterator of GenerateResponse; `.cancel()` aborts)."""
        return self.stub.Generate(request)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with `grace`, calls in flight get that long to finish."""
        if self._channel is not None:
            channel = self._channel
            self._channel = None
            self._stub = None
            await channel.close(grace)

    def __repr__(self) -> str:
        return (
            f"WorkerClient({self.worker_id!r}, role={self.role!r}, address={self.address!r}, "
            f"healthy={self.healthy}, in_flight={self.in_flight})"
        )


def least_loaded(candidates: Sequence[WorkerClient], prompt_token_ids: Sequence[int] | None) -> WorkerClient:
    """Fewest open calls from this frontend, then the fewest queued at the worker, then KV usage."""
    return min(
        candidates,
        key=lambda w: (
            w.in_flight,
            w.stats.num_waiting if w.stats is not None else 0,
            w.kv_usage,
        ),
    )


class WorkerPool:
    """Workers by id; see the module docstring for the lifecycle."""

    def __init__(self, selector: Selector | None = None, stats_interval_s: float = 1.0) -> None:
        self.selector: Selector = selector or least_loaded
        self.stats_interval_s = stats_interval_s
        self._workers: dict[str, WorkerClient] = {}
        self._poller: asyncio.Task | None = None
        self._rr = itertools.count()
        #: Seconds a removed (draining) worker's in-flight calls get before its channel closes.
        self.drain_grace_s = 60.0
        #: Requests a decode worker is prefilling (disaggregated mode) whose first token has
        #: not come back yet (frontend/disagg.py spills a full prefill queue only while
        #: this is under the number of decode workers).
        self.local_prefills = 0
        self._closing: set[asyncio.Task] = set()
        #: Called after every poll round with the pool (metrics hook).
        self.on_stats: list[Callable[[WorkerPool], None]] = []
        #: Called with a worker id when it is removed.
        self.on_remove: list[Callable[[str], None]] = []
        #: Called with the WorkerClient when a worker is added.
        self.on_add: list[Callable[[WorkerClient], None]] = []

    # -- membership --------------------------------------------------------------------
    def add(self, worker_id: str, role: str, address: str) -> WorkerClient:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already in the pool")
        client = WorkerClient(worker_id, role, address)
        self._workers[worker_id] = client
        logger.info("worker %s (%s) at %s added", worker_id, role, address)
        for cb in self.on_add:
            cb(client)
        return client

    async def remove(self, worker_id: str) -> None:
        client = self._workers.pop(worker_id, None)
        if client is None:
            return
        for cb in self.on_remove:
            cb(worker_id)
        # A worker that deregistered is draining: its in-flight streams may finish, so
        # close the channel in the background with a grace period instead of cutting them.
        spawn_tracked(self._closing, client.close(grace=self.drain_grace_s), f"close-{worker_id}")
        logger.info("worker %s removed", worker_id)

    def get(self, worker_id: str) -> WorkerClient | None:
        return self._workers.get(worker_id)

    def workers(self, role: str | None = None, healthy_only: bool = False) -> list[WorkerClient]:
        return [
            w for w in self._workers.values()
            if (role is None or w.role == role) and (w.healthy or not healthy_only)
        ]

    def counts(self) -> dict[str, int]:
        """Healthy workers per role (every known role present)."""
        out = {r: 0 for r in ROLES}
        for w in self._workers.values():
            if w.healthy:
                out[w.role] = out.get(w.role, 0) + 1
        return out

    def max_model_len(self) -> int | None:
        """The smallest limit the healthy workers report (None before any Stats)."""
        lens = [w.max_model_len for w in self.workers(healthy_only=True) if w.max_model_len]
        return min(lens) if lens else None

    # -- choice ------------------------------------------------------------------------
    def pick(
        self,
        role: str = "decode",
        prompt_token_ids: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        retry_after_s: int = 1,
        *,
        request_id: str | None = None,
        remote_kv: bool = False,
    ) -> WorkerClient:
        """One healthy worker of `role` (NoWorkerAvailable: 503). `request_id` and
        `remote_kv` go to a selector that takes request hints (the KV router)."""
        candidates = self._candidates(role, exclude, retry_after_s)
        if getattr(self.selector, "takes_request_hints", False):
            return self.selector(candidates, prompt_token_ids, request_id=request_id,
                                 remote_kv=remote_kv)
        return self.selector(candidates, prompt_token_ids)

    async def pick_async(
        self,
        role: str = "decode",
        prompt_token_ids: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        retry_after_s: int = 1,
        *,
        request_id: str | None = None,
        remote_kv: bool = False,
    ) -> WorkerClient:
        """`pick` for the request path: a selector with `select_async` (one that asks a
        standalone router over gRPC, splitserve.router.remote) is awaited; any other is
        called as `pick` calls it."""
        select = getattr(self.selector, "select_async", None)
        if select is None:
            return self.pick(role, prompt_token_ids, exclude, retry_after_s,
                             request_id=request_id, remote_kv=remote_kv)
        candidates = self._candidates(role, exclude, retry_after_s)
        return await select(candidates, prompt_token_ids, request_id=request_id,
                            remote_kv=remote_kv)

    def _candidates(self, role: str, exclude: Sequence[str], retry_after_s: int
                    ) -> list[WorkerClient]:
        candidates = [
            w for w in self._workers.values()
            if w.role == role and w.healthy and w.worker_id not in exclude
        ]
        if not candidates:
            raise NoWorkerAvailable(role, retry_after_s)
        # Rotate so ties spread over workers instead of always landing on the first.
        k = next(self._rr) % len(candidates)
        return candidates[k:] + candidates[:k]

    # -- request lifecycle (for a selector that tracks load, e.g. the KV router) ----------
    def request_first_token(self, request_id: str) -> None:
        """The request's first token came back from the worker `pick` gave it."""
        hook = getattr(self.selector, "on_first_token", None)
        if hook is not None:
            hook(request_id)

    def request_finished(self, request_id: str) -> None:
        """The request ended (finished, aborted or failed) on every worker it was given."""
        hook = getattr(self.selector, "on_finished", None)
        if hook is not None:
            hook(request_id)

    def uncached_tokens(self, prompt_token_ids: Sequence[int]) -> int:
        """Prompt tokens the best decode worker does not hold in its prefix cache (the KV
        router's index answers; without one every token counts as uncached)."""
        estimate = getattr(self.selector, "uncached_tokens", None)
        return len(prompt_token_ids) if estimate is None else int(estimate(prompt_token_ids))

    async def uncached_tokens_async(self, prompt_token_ids: Sequence[int]) -> int:
        """`uncached_tokens`, awaiting a selector's `uncached_tokens_async` (a remote router)."""
        estimate = getattr(self.selector, "uncached_tokens_async", None)
        if estimate is None:
            return self.uncached_tokens(prompt_token_ids)
        return int(await estimate(prompt_token_ids))

    def mark_failed(self, worker_id: str, reason: str = "") -> None:
        """A call to the worker failed at the transport level: stop picking it until a poll succeeds."""
        w = self._workers.get(worker_id)
        if w is not None and w.healthy:
            w.healthy = False
            logger.warning("worker %s marked unhealthy%s", worker_id, f": {reason}" if reason else "")

    # -- health / stats polling ------------------------------------------------------------
    async def refresh(self, workers: Sequence[WorkerClient] | None = None) -> None:
        """Poll the Stats of `workers` (default: every worker) once, concurrently."""
        workers = list(self._workers.values()) if workers is None else list(workers)
        results = await asyncio.gather(*(w.fetch_stats() for w in workers), return_exceptions=True)
        for w, res in zip(workers, results):
            if isinstance(res, BaseException):
                if w.healthy:
                    logger.warning("worker %s stopped answering Stats: %s", w.worker_id, _short(res))
                w.healthy = False
            else:
                if not w.healthy:
                    logger.info("worker %s (%s) is healthy", w.worker_id, w.role)
                w.stats = res
                w.healthy = True
        for cb in self.on_stats:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - a metrics hook must not stop polling
                logger.exception("stats hook failed")

    async def wait_healthy(self, role: str = "decode", count: int = 1, timeout: float = 30.0) -> None:
        """Poll until `count` workers of `role` are healthy; TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.refresh()
            if self.counts().get(role, 0) >= count:
                return
            if loop.time() >= deadline:
                raise TimeoutError(f"fewer than {count} healthy {role} workers after {timeout}s")
            await asyncio.sleep(0.1)

    async def start(self) -> None:
        """One poll now, then keep polling in the background."""
        await self.refresh()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name="worker-stats-poller")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                logger.exception("worker stats poll failed")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for w in list(self._workers.values()):
            await w.close()
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return f"{exc.code().name}: {details()}"  # type: ignore[attr-defined]
    return repr(exc)
