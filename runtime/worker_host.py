"""Hosting one worker process: an AsyncEngine behind a grpc.aio server, for any role.

Lifecycle: `start()` builds the engine (loads the model), picks the servicer of the role,
binds the gRPC port (0 picks a free one; `port` tells which), starts serving and, with a
discovery URL, registers the worker (role, address, model, block size); `stop()` first
deregisters (frontends stop picking it), flips Health to NOT_SERVING, lets running calls
finish for `grace` seconds, cancels the rest (which aborts their engine requests) and
shuts the engine down.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.config import EngineConfig

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

    def __post_init__(self) -> None:
        if self.role not in SERVICERS:
            raise ValueError(f"role must be one of {'|'.join(SERVICERS)}, got {self.role!r}")
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")
        if self.kv_transport not in ("auto", "nixl", "grpc", "none"):
            raise ValueError(f"kv_transport must be auto|nixl|grpc|none, got {self.kv_transport!r}")
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
        if self.engine is None:
            from splitserve.engine.async_engine import AsyncEngine

            self.engine = AsyncEngine(self.config.engine)
            await self.engine.start()
        self._server = grpc.aio.server(options=list(GRPC_OPTIONS))
        bound = self._server.add_insecure_port(loopback_target(self.config.host, self.config.port))
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {self.config.host}:{self.config.port}")
        self.port = bound
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
        if hasattr(self.servicer, "start"):
            await self.servicer.start()
        logger.info("%s worker %s serving on %s", self.config.role, self.worker_id, self.address)
        if self.config.discovery_url:
            await self._register()

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
                       "kv_transport": self.transport.kind if self.transport else ""},
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
