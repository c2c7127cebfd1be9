"""`RemoteRouting`: the frontend's WorkerPool selector when the router runs standalone
(`splitserve frontend --router-address HOST:PORT`, `splitserve router`).

Lifecycle: `RemoteRouting(address, pool)`; `start()` (in the app's lifespan, on its
loop) opens the channel, becomes the pool's selector, tells the router of every worker
the pool has or gets (`AddWorker`, idempotent by address: the router usually knows them
already from its own discovery) and polls the router's `Stats` for /metrics. `stop()`
releases the requests it still has booked (`MarkFinished`) and closes the channel.

Per request: the pool awaits `select_async(candidates, prompt, request_id=, remote_kv=)`
(`WorkerPool.pick_async`), which asks `Route` with the candidates' addresses and the
request id prefixed by this frontend's client id (request ids stay unique across
frontends). `known=False` (the router follows none of the candidates yet): the pool's
least-loaded choice, nothing booked. Every worker busy (RESOURCE_EXHAUSTED): 503 with the
router's Retry-After. The router unreachable or failing: 503 `router_unavailable` —
never a silent local choice, which would split the shared load view. The request's first
token and its end (`on_first_token` / `on_finished`, sync hooks of the pool) are queued
and sent in order by one task (`MarkPrefillDone` / `MarkFinished`, batched); a `Route`
for a request with marks still queued sends them first, so the router sees every
request's events in the order the frontend made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

from splitserve.frontend.errors import NoWorkerAvailable, OpenAIError
from splitserve.frontend.worker_pool import WorkerClient, WorkerPool, _short, least_loaded
from splitserve.runtime.aio import spawn_tracked

logger = logging.getLogger(__name__)

_FIRST, _FINISHED = "first", "finished"


class RouterUnavailable(OpenAIError):
    """The standalone router did not answer: 503 with Retry-After."""

    def __init__(self, address: str, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(
            503, f"the router at {address} is unavailable ({detail}); retry later",
            code="router_unavailable", headers={"Retry-After": str(retry_after_s)},
        )


class RemoteRouting:
    """The pool's selector backed by a standalone router; see the module docstring."""

    #: WorkerPool.pick passes request_id / remote_kv to this selector.
    takes_request_hints = True

    def __init__(
        self,
        address: str,
        pool: WorkerPool,
        *,
        timeout_s: float = 5.0,
        stats_interval_s: float = 1.0,
        retry_after_s: int = 1,
        client_id: str | None = None,
    ) -> None:
        if ":" not in address:
            raise ValueError(f"router address must be HOST:PORT, got {address!r}")
        if timeout_s <= 0 or stats_interval_s <= 0:
            raise ValueError("timeout_s and stats_interval_s must be > 0")
        self.address = address
        self.pool = pool
        self.timeout_s = timeout_s
        self.stats_interval_s = stats_interval_s
        self.retry_after_s = retry_after_s
        self.client_id = client_id or f"frontend-{secrets.token_hex(4)}"
        self._channel: Any = None
        self._stub: Any = None
        self._tasks: set[asyncio.Task] = set()
        #: Marks not sent yet, in order, and per request id how many marks are queued or on
        #: their way (a mark stays pending until the router has answered its call).
        self._marks: list[tuple[str, str]] = []
        self._pending: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        #: Requests booked at the router and not finished yet (router-side ids).
        self._booked: set[str] = set()
        #: The router's last Stats (None before the first answer).
        self.router_stats: Any = None
        #: pool worker id -> requests this frontend routed there / prefix blocks hit there.
        self.routed: dict[str, int] = {}
        self.routed_overlap_blocks: dict[str, int] = {}
        #: Picks made without the router (it followed none of the candidates).
        self.fallback_picks = 0
        #: Route calls that failed because the router was unreachable.
        self.unavailable = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        import grpc

        from splitserve.proto import router_pb2_grpc
        from splitserve.runtime.grpc_util import GRPC_OPTIONS

        if self._channel is not None:
            return
        self._channel = grpc.aio.insecure_channel(self.address, options=list(GRPC_OPTIONS))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.pool.selector = self
        self.pool.on_add.append(self._on_add)
        for client in self.pool.workers():
            self._on_add(client)
        self._spawn(self._send_loop(), "router-marks")
        self._spawn(self._stats_loop(), "router-stats")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.pool.on_add.remove(self._on_add)
        for rid in list(self._booked):  # release what this frontend still holds there
            self._queue(_FINISHED, rid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), timeout=self.timeout_s)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        return spawn_tracked(self._tasks, coro, name)

    def _on_add(self, client: WorkerClient) -> None:
        self._spawn(self._add_worker(client), f"router-add:{client.worker_id}")

    async def _add_worker(self, client: WorkerClient) -> None:
        from splitserve.proto import router_pb2

        info = router_pb2.WorkerInfo(worker_id=client.worker_id, role=client.role,
                                     address=client.address)
        try:
            await self._stub.AddWorker(router_pb2.AddWorkerRequest(worker=info),
                                       timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the router may know it from discovery
            logger.warning("could not tell the router at %s of worker %s: %s",
                           self.address, client.worker_id, _short(exc))

    # -- the selector ---------------------------------------------------------------------------
    def __call__(self, candidates: Sequence[WorkerClient],
                 prompt_token_ids: Sequence[int] | None, **hints: Any) -> WorkerClient:
        """A synchronous pick cannot ask the router: the pool's least-loaded choice (the
        request path uses `WorkerPool.pick_async`, which awaits `select_async`)."""
        self.fallback_picks += 1
        return least_loaded(candidates, prompt_token_ids)

    def _rid(self, request_id: str) -> str:
        return f"{self.client_id}/{request_id}"

    async def select_async(
        self,
        candidates: Sequence[WorkerClient],
        prompt_token_ids: Sequence[int] | None,
        *,
        request_id: str | None = None,
        remote_kv: bool = False,
    ) -> WorkerClient:
        import grpc

        from splitserve.proto import router_pb2

        pool_name = "prefill" if candidates[0].role == "prefill" else "decode"
        rid = self._rid(request_id) if request_id is not None else ""
        if rid and rid in self._pending:
            # The router must see this request's earlier marks first: queued ones are sent,
            # and one already on its way is waited for (the lock is held while it is sent).
            await self._flush()
        req = router_pb2.RouteRequest(
            request_id=rid, token_ids=list(prompt_token_ids or ()), pool=pool_name,
            remote_kv=remote_kv, candidates=[c.address for c in candidates],
            client_id=self.client_id)
        try:
            resp = await self._call("Route", req)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NoWorkerAvailable(pool_name, _retry_after(exc)) from None
            raise
        by_address = {c.address: c for c in candidates}
        client = by_address.get(resp.worker_address) if resp.known else None
        if client is None:
            self.fallback_picks += 1
            return least_loaded(candidates, prompt_token_ids)
        if rid:
            self._booked.add(rid)
        if pool_name == "decode":
            self.routed[client.worker_id] = self.routed.get(client.worker_id, 0) + 1
            self.routed_overlap_blocks[client.worker_id] = (
                self.routed_overlap_blocks.get(client.worker_id, 0) + resp.overlap_blocks)
        return client

    async def uncached_tokens_async(self, prompt_token_ids: Sequence[int]) -> int:
        from splitserve.proto import router_pb2

        req = router_pb2.UncachedTokensRequest(token_ids=list(prompt_token_ids))
        return int((await self._call("UncachedTokens", req)).uncached_tokens)

    async def _call(self, method: str, request: Any) -> Any:
        """One unary call; unreachable or failing router (anything but a busy answer):
        RouterUnavailable (503)."""
        import grpc

        if self._stub is None:
            raise RouterUnavailable(self.address, "not connected", self.retry_after_s)
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            self.unavailable += 1
            logger.warning("router at %s failed %s: %s", self.address, method, _short(exc))
            raise RouterUnavailable(self.address, _short(exc), self.retry_after_s) from None

    # -- request progress -----------------------------------------------------------------------
    def on_first_token(self, request_id: str) -> None:
        rid = self._rid(request_id)
        if rid in self._booked:
            self._queue(_FIRST, rid)

    def on_finished(self, request_id: str) -> None:
        rid = self._rid(request_id)
        if rid in self._booked:
            self._booked.discard(rid)
            self._queue(_FINISHED, rid)

    def _queue(self, kind: str, rid: str) -> None:
        self._marks.append((kind, rid))
        self._pending[rid] = self._pending.get(rid, 0) + 1
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Send every queued mark, in order (consecutive marks of a kind in one call)."""
        from splitserve.proto import router_pb2

        async with self._send_lock:
            while self._marks:
                batch, self._marks = self._marks, []
                for kind, ids in _runs(batch):
                    method = "MarkPrefillDone" if kind == _FIRST else "MarkFinished"
                    try:
                        await getattr(self._stub, method)(
                            router_pb2.MarkRequest(request_ids=ids), timeout=self.timeout_s)
                    except Exception as exc:  # noqa: BLE001 - the router's request timeout
                        logger.warning("router at %s: %s of %d requests lost (%s); it drops "
                                       "them after its request timeout", self.address, method,
                                       len(ids), _short(exc))
                for _, rid in batch:  # answered (or lost): a Route need not wait for them
                    left = self._pending[rid] - 1
                    if left:
                        self._pending[rid] = left
                    else:
                        del self._pending[rid]

    # -- introspection ------------------------------------------------------------------------
    async def _stats_loop(self) -> None:
        from splitserve.proto import router_pb2

        reachable = True
        while True:
            try:
                self.router_stats = await self._stub.Stats(router_pb2.RouterStatsRequest(),
                                                           timeout=self.timeout_s)
                if not reachable:
                    logger.info("router at %s answers again", self.address)
                reachable = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if reachable:
                    logger.warning("router at %s does not answer Stats: %s", self.address,
                                   _short(exc))
                reachable = False
            await asyncio.sleep(self.stats_interval_s)

    def metrics(self) -> dict[str, Any]:
        """KvRouting.metrics()' shape for /metrics: router-wide figures (every frontend's
        requests) from the router's last Stats; `routed`, `routed_overlap_blocks` and
        `fallback_picks` are this frontend's own."""
        s = self.router_stats
        m: dict[str, Any] = {"mode": s.mode if s is not None else "remote"}
        if s is not None:
            for key in ("requests", "prompt_blocks", "overlap_blocks", "no_worker", "resyncs",
                        "prefix_hit_rate", "indexed_blocks", "tracked_requests"):
                m[key] = getattr(s, key)
            m["workers"] = [(w.worker_id, w.role, w.state) for w in s.workers]
        m["fallback_picks"] = self.fallback_picks
        m["routed"] = dict(self.routed)
        m["routed_overlap_blocks"] = dict(self.routed_overlap_blocks)
        return m


def _runs(marks: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for kind, rid in marks:
        if out and out[-1][0] == kind:
            out[-1][1].append(rid)
        else:
            out.append((kind, [rid]))
    return out


def _retry_after(exc: Any) -> int:
    from splitserve.router.grpc_service import RETRY_AFTER_KEY

    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError):
                return max(1, math.ceil(float(value)))
    return 1

