"""Connectors: apply planner decisions to a deployment, behind one protocol and a registry.

Registered: `dry-run` (records decisions), `kubernetes` (Deployment replicas), `local`
(worker processes of a deployment on this host, e.g. one `splitserve serve` started) and
`ray` (workers as Ray actors, e.g. of `splitserve serve --ray`); the last two share
`workers.py`.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any, Mapping

from splitserve.planner.connectors.base import Connector, ConnectorError

#: connector name -> "module:class"; read-only.
CONNECTORS: Mapping[str, str] = MappingProxyType(
    {
        "dry-run": "splitserve.planner.connectors.dry_run:DryRunConnector",
        "kubernetes": "splitserve.planner.connectors.kubernetes:KubernetesConnector",
        "local": "splitserve.planner.connectors.local:LocalConnector",
        "ray": "splitserve.planner.connectors.ray:RayConnector",
    }
)


def create_connector(name: str, **options: Any) -> Connector:
    """Build the connector registered as `name` with its keyword options."""
    try:
        target = CONNECTORS[name]
    except KeyError:
        raise ConnectorError(f"unknown connector {name!r}; available: {', '.join(CONNECTORS)}") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**options)


__all__ = ["CONNECTORS", "Connector", "ConnectorError", "create_connector"]
