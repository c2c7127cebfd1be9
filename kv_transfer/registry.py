"""Transport registry and create_transport(): 'auto' picks NIXL when it works, else gRPC."""

from __future__ import annotations

import asyncio
import importlib
import logging
from types import MappingProxyType
from typing import TYPE_CHECKING

from .base import KvTransport
from .config import KvTransferConfig, validate_kind
from .errors import KvTransportUnavailable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: kind -> "module:Class", imported on use (grpc is not imported by a NIXL worker and vice versa).
TRANSPORTS = MappingProxyType({
    "nixl": "splitserve.kv_transfer.nixl_transport:NixlTransport",
    "grpc": "splitserve.kv_transfer.grpc_transport:GrpcTransport",
})


def transport_class(kind: str) -> type:
    module_name, _, cls_name = TRANSPORTS[kind].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


async def create_transport(
    kind: str,
    name: str,
    kv_cache: torch.Tensor,
    config: KvTransferConfig | None = None,
) -> KvTransport:
    """Build and start the transport of one worker over its whole KV pool (registered once).

    kind: "auto" (NIXL when it imports and its UCX backend initializes, else gRPC), "nixl"
    (KvTransportUnavailable if it cannot start) or "grpc". `name` must be unique among the
    workers that talk to each other (it is the NIXL agent name). Logs the chosen transport at
    INFO. Call from the event loop that will use the transport.
    """
    kind = validate_kind(kind)
    if not name:
        raise ValueError("a KV transport needs a non-empty name")
    config = config or KvTransferConfig()
    if kind in ("auto", "nixl"):
        try:
            # agent start-up and pool registration take a moment: keep them off the event loop
            transport = await asyncio.to_thread(transport_class("nixl"), name, kv_cache, config)
        except KvTransportUnavailable as exc:
            if kind == "nixl":
                raise
            logger.info("KV transport: grpc (auto; NIXL unavailable: %s)", exc)
        else:
            logger.info("KV transport: nixl (%s, %s) for %s", "+".join(config.nixl_backends),
                        transport.layout.device_type, name)
            return transport
    else:
        logger.info("KV transport: grpc for %s", name)
    transport = transport_class("grpc")(name, kv_cache, config)
    try:
        await transport.start()
    except BaseException:
        await transport.close()
        raise
    return transport
