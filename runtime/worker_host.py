"""Hosting one worker process: an AsyncEngine behind a grpc.aio server, for any role.

Lifecycle: `start()` binds the gRPC port (0 picks a free one; `port` tells which), builds
the engine (loads the model) with a `KvEventServer`'s publisher as its block pool's event
sink, picks the servicer of the role, starts serving (the Worker service and, on the same
port, the router's KvEvents methods: block stored/removed/cleared batches flushed after
each engine step and every `kv_events_flush_s`, a snapshot on request, load every 0.5 s) and, with a discovery URL,
registers the worker (role, address, model, block size, `kv_events`); `stop()` first
deregisters (frontends stop picking it), flips Health to NOT_SERVING, ends the routers' event
streams, lets running calls finish for `grace` seconds, cancels the rest (which aborts their
engine requests) and shuts the engine down.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.config import EngineConfig
from splitserve.kv_transfer.config import TRANSPORT_KINDS

logger = logging.getLogger(__name__)

#: role -> "module:ServicerClass"; a servicer takes (engine, worker_id=, role=, model_name=).
SERVICERS: dict[str, str] = {
    "decode": "splitserve.decode_worker.service:WorkerServicer",
    "prefill": "splitserve.prefill_worker.service:PrefillWorkerServicer",
}

ROLES = tuple(SERVICERS)


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process."""

    #: "decode" (generates; prefills locally when no KV handle) or "prefill".
    role: str = "decode"
    #: Address to bind; loopback unless told otherwise.
    host: str = "127.0.0.1"
    #: gRPC port; 0 picks a free one.
    port: int = 0
    #: Stable id reported in Stats/Health; None: "<role>-<host>:<port>".
    worker_id: str | None = None
    #: The engine this worker embeds.
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: Seconds running calls get to finish on stop().
    shutdown_grace_s: float = 5.0
    #: Discovery URL to register with (`embedded://NAME`, `etcd://...`); None: don't.
    discovery_url: str | None = None
    #: Host others reach this worker at; None: `host`, or this machine's name if wildcard.
    advertise_host: str | None = None
    #: Seconds a registration outlives a worker that stopped renewing it (killed).
    discovery_ttl_s: float = 10.0
    #: KV transport between prefill and decode workers: auto (NIXL if it starts, else
    #: gRPC) | nixl | grpc | none.
    kv_transport: str = "auto"
    #: Prefill workers: seconds pinned KV blocks wait for a pull before they are freed.
    kv_pin_timeout_s: float = 30.0
    #: Decode workers: seconds one KV pull may take before falling back to local prefill.
    kv_pull_timeout_s: float = 10.0
    #: Publish the block pool's KV events (stored/removed/cleared) and load on the
    #: `splitserve.router.KvEvents` gRPC methods of this worker's server, for KV-aware routers.
    kv_events: bool = True
    #: The engine flushes pending KV events after each step; this timer (seconds) is the
    #: backstop for events raised between steps.
    kv_events_flush_s: float = 0.1

    def __post_init__(self) -> None:
        if self.role not in SERVICERS:
            raise ValueError(f"role must be one of {'|'.join(SERVICERS)}, got {self.role!r}")
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")
        if self.kv_transport not in (*TRANSPORT_KINDS, "none"):
            raise ValueError(f"kv_transport must be {'|'.join(TRANSPORT_KINDS)}|none, got {self.kv_transport!r}")
        if self.kv_events_flush_s <= 0:
            raise ValueError("kv_events_flush_s must be > 0")
        if self.kv_pin_timeout_s <= 0 or self.kv_pull_timeout_s <= 0:
            raise ValueError("kv_pin_timeout_s and kv_pull_timeout_s must be > 0")


def servicer_class(role: str) -> type:
    module_name, _, cls = SERVICERS[role].partition(":")
    return getattr(importlib.import_module(module_name), cls)


class WorkerHost:
    """An engine plus its gRPC server; create, `await start()`, then `await stop()`."""

    def __init__(self, config: WorkerConfig, engine: Any | None = None) -> None:
        self.config = config
        self.engine = engine
        self.servicer: Any = None
        self._server: Any = None
        self._discovery: Any = None
        self.transport: Any = None
        self.port: int | None = None
        #: The KV event server routers subscribe to (None with `kv_events=False`).
        self.kv_events: Any = None

    @property
    def worker_id(self) -> str:
        if self.config.worker_id:
            return self.config.worker_id
        return f"{self.config.role}-{self.config.host}:{self.port}"

    @property
    def address(self) -> str:
        """`host:port` others dial (the advertised host)."""
        from splitserve.runtime.grpc_util import loopback_target

        host = self.config.advertise_host or self.config.host
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        return loopback_target(host, int(self.port or 0))

    async def start(self) -> None:
        import grpc

        from splitserve.proto import worker_pb2_grpc
        from splitserve.runtime.grpc_util import GRPC_OPTIONS, loopback_target

        cls = servicer_class(self.config.role)  # fail fast on a role not built yet
        # Bind first: the worker id (and so the KV event publisher) may name the port.
        self._server = grpc.aio.server(options=list(GRPC_OPTIONS))
        bound = self._server.add_insecure_port(loopback_target(self.config.host, self.config.port))
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {self.config.host}:{self.config.port}")
        self.port = bound
        if self.config.kv_events:
            engine_cfg = self.engine.config if self.engine is not None else self.config.engine
            self.kv_events = self._make_kv_events(engine_cfg.block_size)
        if self.engine is None:
            from splitserve.engine.async_engine import AsyncEngine

            sink = {"event_sink": self.kv_events.publisher} if self.kv_events else {}
            self.engine = AsyncEngine(self.config.engine, **sink)
            await self.engine.start()
        elif self.kv_events is not None:
            # An engine built by the caller: publish from its pool unless it has a sink.
            pool = self.engine.engine.pool
            if pool.event_sink is None:
                pool.event_sink = self.kv_events.publisher
            else:
                logger.warning("engine pool already has an event sink; %s publishes no "
                               "KV events", self.worker_id)
                self.kv_events = None
        if self.kv_events is not None:
            self.kv_events.total_blocks = int(self.engine.stats().num_total_blocks)
            self.kv_events.attach(self._server)
        await self._start_transport()
        kwargs: dict[str, Any] = {"transport": self.transport}
        if self.config.role == "prefill":
            kwargs.update(pin_timeout_s=self.config.kv_pin_timeout_s, address=self.address)
        else:
            kwargs.update(pull_timeout_s=self.config.kv_pull_timeout_s)
        self.servicer = cls(
            self.engine,
            worker_id=self.worker_id,
            role=self.config.role,
            model_name=self.config.engine.model,
            **kwargs,
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self._server)
        await self._server.start()
        if self.kv_events is not None:
            await self.kv_events.start()
        if hasattr(self.servicer, "start"):
            await self.servicer.start()
        logger.info("%s worker %s serving on %s", self.config.role, self.worker_id, self.address)
        if self.config.discovery_url:
            await self._register()

    def _make_kv_events(self, block_size: int) -> Any:
        """The KV event server of this worker; its sources read the engine once it exists."""
        from splitserve.router.service import KvEventServer

        return KvEventServer(
            self.worker_id,
            block_size,
            # Both run on the event loop while the engine thread steps: cached_hashes() is a
            # single list() of a dict (atomic under the GIL), stats() the last step's copy.
            snapshot_source=lambda: self.engine.engine.pool.cached_hashes(),
            stats_source=lambda: self.engine.stats(),
            flush_interval_s=self.config.kv_events_flush_s,
        )

    async def _start_transport(self) -> None:
        """Register this worker's whole KV pool with the transport (once)."""
        if self.config.kv_transport == "none":
            return
        import os
        import uuid

        from splitserve.kv_transfer import KvTransferConfig, create_transport

        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "0.0.0.0"
        advertise = self.address.rsplit(":", 1)[0].strip("[]")
        # Unique among peers even when a worker restarts on the same port.
        name = f"{self.worker_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.transport = await create_transport(
            self.config.kv_transport, name, self.engine.engine.runner.kv_cache,
            KvTransferConfig(host=host, advertise_host=advertise),
        )

    async def _register(self) -> None:
        from splitserve.runtime.discovery import WorkerRecord, open_discovery

        self._discovery = await open_discovery(self.config.discovery_url)
        await self._discovery.register(
            WorkerRecord(
                id=self.worker_id,
                role=self.config.role,
                address=self.address,
                model=self.config.engine.model,
                block_size=self.config.engine.block_size,
                nixl_metadata=self.transport.local_metadata() if self.transport else None,
                extra={"max_model_len": int(self.engine.max_model_len),
                       "kv_transport": self.transport.kind if self.transport else "",
                       # KvEvents methods on `address` (splitserve.router.service).
                       "kv_events": self.kv_events is not None},
            ),
            ttl_s=self.config.discovery_ttl_s,
        )
        logger.info("worker %s registered with %s", self.worker_id, self.config.discovery_url)

    async def stop(self, grace: float | None = None) -> None:
        if self._discovery is not None:
            try:
                await self._discovery.close()  # deregisters
            except Exception:  # noqa: BLE001 - the record expires with its TTL anyway
                logger.warning("could not deregister %s", self.worker_id, exc_info=True)
            self._discovery = None
        if self.servicer is not None:
            self.servicer.set_serving(False)
        if self.kv_events is not None:
            # End the routers' (endless) event streams so the grace below is for requests.
            await self.kv_events.stop()
            self.kv_events = None
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
            self._server = None
        if self.servicer is not None and hasattr(self.servicer, "stop"):
            await self.servicer.stop()
        if self.transport is not None:
            await self.transport.close()
            self.transport = None
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine = None
