"""The `Connector` protocol: how the planner reads and changes the pool sizes."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from splitserve.planner.types import Decision


@runtime_checkable
class Connector(Protocol):
    """Applies planner decisions to a deployment (local processes, Ray, Kubernetes, dry-run)."""

    def current(self) -> tuple[int, int]:
        """The (prefill, decode) replica counts that exist now, starting ones included."""

    def apply(self, decision: Decision) -> None:
        """Resize the pools to `decision.prefill_replicas` / `decision.decode_replicas`.

        Returns once the change is requested; replicas may take a while to become ready.
        """

    def close(self) -> None:
        """Release what the connector holds (files, clients); pools are left as they are.

        Exception: `local` and `ray` stop (drain) the workers they started, which would die
        with the planner anyway; workers they did not start are left as they are.
        """


class ConnectorError(RuntimeError):
    """A connector that cannot be built or cannot reach its deployment."""
