"""`RouterService`: the KV router as a gRPC service (`splitserve router`), so several
frontends share one KV index and one load view (proto/router.proto).

Lifecycle: `RouterService(config, workers=[(role, address)], discovery_url=...)`;
`start(host, port)` builds what an in-process frontend builds for its router — a
`WorkerPool` of its own (the static workers, then every worker discovery announces,
through `DiscoverySync`; Stats polled for health and approximate-mode load) and a
`KvRouting` following every pool worker's KV events (approximate mode without them) —
then binds the gRPC server and returns its port. `stop()` ends the server, discovery,
the subscriptions and the polling.

Per request: `Route` names the client's candidate workers by address; the router picks
among the pool workers at those addresses (`KvRouting.select`: prefix overlap and load,
the request booked in the load view under the client's request id), or answers
`known=False` when it follows none of them yet (the client picks by itself). Every
candidate busy: RESOURCE_EXHAUSTED with trailing metadata `splitserve-retry-after`.
`MarkPrefillDone` / `MarkFinished` carry the request's first token and its end, as the
frontend's pool relays them to an in-process router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.routing import KvRouting
from splitserve.frontend.worker_pool import ROLES, WorkerClient, WorkerPool, static_worker_id
from splitserve.proto import router_pb2, router_pb2_grpc
from splitserve.router.config import RouterConfig

logger = logging.getLogger(__name__)

#: Trailing metadata of a RESOURCE_EXHAUSTED Route: seconds to wait before retrying.
RETRY_AFTER_KEY = "splitserve-retry-after"

#: Integer counters of RouterStatsResponse, as KvRouting.metrics() names them.
_COUNTERS = ("requests", "remote_prefills", "prompt_blocks", "overlap_blocks", "no_worker",
             "indexed_blocks", "tracked_requests", "fallback_picks", "resyncs")


class RouterService(router_pb2_grpc.RouterServicer):
    """The Router gRPC service around a KvRouting; see the module docstring."""

    def __init__(
        self,
        config: RouterConfig,
        workers: Sequence[tuple[str, str]] = (),
        *,
        discovery_url: str | None = None,
        model: str | None = None,
        stats_interval_s: float = 1.0,
        subscriber_backoff_s: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        self.config = config
        self.pool = WorkerPool(stats_interval_s=stats_interval_s)
        self.routing = KvRouting(config, self.pool, subscriber_backoff_s=subscriber_backoff_s)
        self._static = list(workers)
        self._discovery_url = discovery_url
        self._model = model
        self._sync: Any = None
        self._server: grpc.aio.Server | None = None
        #: client id -> requests it booked through Route.
        self.clients: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Follow the workers, serve on host:port (0: a free port); the bound port."""
        from splitserve.runtime.grpc_util import GRPC_OPTIONS, loopback_target

        for role, address in self._static:
            self.pool.add(static_worker_id(role, address), role, address)
        await self.routing.start()  # before discovery: it follows every worker that joins
        if self._discovery_url:
            from splitserve.frontend.discovery_sync import DiscoverySync

            self._sync = DiscoverySync(self.pool, self._discovery_url, model=self._model)
            await self._sync.start()
        await self.pool.start()
        # No SO_REUSEPORT: a second router on the same port would split the load view.
        self._server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
        router_pb2_grpc.add_RouterServicer_to_server(self, self._server)
        try:
            bound = self._server.add_insecure_port(loopback_target(host, port))
        except RuntimeError:  # grpc's way of saying the bind failed
            bound = 0
        if bound == 0:
            await self.stop()
            raise OSError(f"cannot bind the router's gRPC port on {host}:{port}")
        await self._server.start()
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._sync is not None:
            await self._sync.stop()
            self._sync = None
        await self.routing.stop()
        await self.pool.close()

    # -- routing ------------------------------------------------------------------------------
    async def Route(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        pool_name = request.pool or "decode"
        if pool_name not in ROLES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"pool must be one of {'|'.join(ROLES)}, got {pool_name!r}")
        candidates = self._candidates(pool_name, request.candidates)
        if not candidates:
            return router_pb2.RouteResponse(known=False)
        rid = request.request_id or None
        try:
            client, sel = self.routing.select(candidates, list(request.token_ids),
                                              request_id=rid, remote_kv=request.remote_kv)
        except NoWorkerAvailable as exc:
            context.set_trailing_metadata(
                ((RETRY_AFTER_KEY, exc.headers.get("Retry-After", "1")),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        if sel is None:  # follows none of them yet: the client's own choice
            return router_pb2.RouteResponse(known=False)
        if rid is not None:
            cid = request.client_id or "anonymous"
            self.clients[cid] = self.clients.get(cid, 0) + 1
        return router_pb2.RouteResponse(
            known=True, worker_address=client.address, worker_id=client.worker_id,
            overlap_blocks=sel.overlap_blocks, num_blocks=sel.num_blocks)

    def _candidates(self, pool_name: str, addresses: Sequence[str]) -> list[WorkerClient]:
        workers = self.pool.workers(pool_name)
        if not addresses:
            return [w for w in workers if w.healthy]
        wanted = set(addresses)
        return [w for w in workers if w.address in wanted]

    async def MarkPrefillDone(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        for rid in request.request_ids:
            self.routing.on_first_token(rid)
        return router_pb2.MarkResponse()

    async def MarkFinished(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        for rid in request.request_ids:
            self.routing.on_finished(rid)
        return router_pb2.MarkResponse()

    async def UncachedTokens(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        n = self.routing.uncached_tokens(list(request.token_ids))
        return router_pb2.UncachedTokensResponse(uncached_tokens=n)

    # -- workers ------------------------------------------------------------------------------
    async def AddWorker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        w = request.worker
        if w.role not in ROLES or ":" not in w.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a worker needs a role ({'|'.join(ROLES)}) and a HOST:PORT "
                                f"address, got role={w.role!r} address={w.address!r}")
        for existing in self.pool.workers():
            if existing.address == w.address:
                return router_pb2.AddWorkerResponse(added=False, worker_id=existing.worker_id)
        wid = w.worker_id or static_worker_id(w.role, w.address)
        if self.pool.get(wid) is not None:  # the same id at a new address: replace it
            await self.pool.remove(wid)
        client = self.pool.add(wid, w.role, w.address)
        with contextlib.suppress(Exception):
            await self.pool.refresh([client])
        return router_pb2.AddWorkerResponse(added=True, worker_id=wid)

    async def RemoveWorker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        removed = self.pool.get(request.worker_id) is not None
        await self.pool.remove(request.worker_id)
        return router_pb2.RemoveWorkerResponse(removed=removed)

    async def ListWorkers(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return router_pb2.ListWorkersResponse(workers=self.worker_infos())

    def worker_infos(self) -> list[Any]:
        return [router_pb2.WorkerInfo(worker_id=w.worker_id, role=w.role, address=w.address,
                                      state=self.routing.worker_state(w))
                for w in self.pool.workers()]

    # -- introspection ------------------------------------------------------------------------
    async def Stats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.routing.metrics()
        return router_pb2.RouterStatsResponse(
            mode=self.config.mode, block_size=self.config.block_size,
            prefix_hit_rate=float(m.get("prefix_hit_rate", 0.0)),
            workers=self.worker_infos(),
            routed=m.get("routed", {}), routed_overlap_blocks=m.get("routed_overlap_blocks", {}),
            clients=self.clients,
            **{k: int(m.get(k, 0)) for k in _COUNTERS},
        )

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        states = [self.routing.worker_state(w) for w in self.pool.workers("decode")]
        ok = any(s != "connecting" for s in states)
        return router_pb2.RouterHealthResponse(status="ok" if ok else "no_workers",
                                               num_workers=len(self.pool.workers()))


async def serve_until(service: RouterService, stop: asyncio.Event, host: str, port: int,
                      on_ready: Any = None) -> int:
    """Start `service` on host:port, call `on_ready(port)`, run until `stop` is set."""
    bound = await service.start(host, port)
    try:
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()
    finally:
        await service.stop()
    return bound
