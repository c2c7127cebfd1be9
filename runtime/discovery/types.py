"""The discovery contract: worker records, watch events, registrations and the protocol.

A worker process registers one `WorkerRecord` with a TTL; the backend keeps it alive in the
background (an etcd lease keep-alive, or a heartbeat on the embedded backend) until the
worker deregisters, closes its `Discovery`, or dies. A dead worker's record disappears
within its TTL. Readers either `list()` the live records or `watch()` them: a watch first
replays the live records as "put" events, then yields every change.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

#: Roles a worker may register with.
ROLES: tuple[str, ...] = ("prefill", "decode")

#: Default time-to-live of a registration, in seconds.
DEFAULT_TTL_S: float = 10.0

#: Version of the JSON encoding of a record (bumped on incompatible change).
RECORD_FORMAT_VERSION = 1

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")

EventType = Literal["put", "delete"]


class DiscoveryError(RuntimeError):
    """Base class of discovery failures."""


class DiscoveryUnavailableError(DiscoveryError):
    """The discovery service (etcd) could not be reached in time."""


class DiscoveryConfigError(DiscoveryError, ValueError):
    """A discovery URL or option is invalid."""


class InvalidRecordError(ValueError):
    """A `WorkerRecord` field is invalid, or a stored record cannot be decoded."""


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker publishes about itself.

    Encoded as JSON (`to_json` / `from_json`); `nixl_metadata` travels as base64.
    """

    id: str
    """Unique worker id within the deployment: letters, digits and `_ . : @ -`, no `/`."""
    role: str
    """`"prefill"` or `"decode"`."""
    address: str
    """The worker's gRPC address, `host:port`."""
    model: str
    """The model (name or alias) the worker serves."""
    block_size: int
    """Tokens per KV block of the worker's engine."""
    nixl_metadata: bytes | None = None
    """The worker's NIXL agent metadata (opaque bytes), or None without NIXL."""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    """Free-form JSON-serialisable extras (agent name, capacity, version, ...)."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise InvalidRecordError(
                f"worker id {self.id!r} must be 1-128 chars of letters, digits, '_.:@-' "
                "and start with a letter or digit"
            )
        if self.role not in ROLES:
            raise InvalidRecordError(f"worker role {self.role!r} must be one of {ROLES}")
        host, sep, port = str(self.address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidRecordError(f"worker address {self.address!r} must be 'host:port'")
        if not isinstance(self.model, str) or not self.model:
            raise InvalidRecordError("worker model must be a non-empty string")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise InvalidRecordError(f"block_size {self.block_size!r} must be a positive int")
        if self.nixl_metadata is not None and not isinstance(self.nixl_metadata, (bytes, bytearray)):
            raise InvalidRecordError("nixl_metadata must be bytes or None")
        if not isinstance(self.extra, dict):
            raise InvalidRecordError("extra must be a dict")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nixl_metadata base64-encoded)."""
        return {
            "v": RECORD_FORMAT_VERSION,
            "id": self.id,
            "role": self.role,
            "address": self.address,
            "model": self.model,
            "block_size": self.block_size,
            "nixl_metadata": (
                base64.b64encode(bytes(self.nixl_metadata)).decode("ascii")
                if self.nixl_metadata is not None
                else None
            ),
            "extra": self.extra,
        }

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"record extra is not JSON-serialisable: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerRecord:
        if not isinstance(data, dict):
            raise InvalidRecordError("a worker record must be a JSON object")
        try:
            raw = data.get("nixl_metadata")
            return cls(
                id=data["id"],
                role=data["role"],
                address=data["address"],
                model=data["model"],
                block_size=data["block_size"],
                nixl_metadata=base64.b64decode(raw, validate=True) if raw is not None else None,
                extra=dict(data.get("extra") or {}),
            )
        except KeyError as exc:
            raise InvalidRecordError(f"worker record lacks field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidRecordError):
                raise
            raise InvalidRecordError(f"bad worker record: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRecordError(f"worker record is not JSON: {exc}") from exc
        return cls.from_dict(data)


class WatchEvent(NamedTuple):
    """One membership change; unpacks as `(event_type, record)`."""

    type: EventType
    record: WorkerRecord


class Registration:
    """Handle of one live registration, returned by `Discovery.register`.

    The backend keeps it alive until `Discovery.deregister(handle)` or `Discovery.close()`.
    """

    def __init__(self, record: WorkerRecord, ttl_s: float, key: str) -> None:
        self.record = record
        """The registered record."""
        self.ttl_s = ttl_s
        """Time-to-live: the record disappears this long after its owner stops renewing it."""
        self.key = key
        """Where the record is stored (an etcd key, or a file path)."""
        self.closed = False
        """True once deregistered."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.record.id!r}, role={self.record.role!r}, key={self.key!r})"


@runtime_checkable
class Discovery(Protocol):
    """Membership of the worker pools. Every method is a coroutine except `watch`."""

    async def register(self, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> Registration:
        """Publish `record` (replacing any record with the same role and id) and keep it
        alive in the background; raises `DiscoveryUnavailableError` if the store cannot be
        reached within the backend's timeout."""
        ...

    async def deregister(self, handle: Registration) -> None:
        """Stop renewing `handle` and remove its record at once (idempotent)."""
        ...

    async def list(self, role: str | None = None) -> list[WorkerRecord]:
        """The live records, optionally of one role, sorted by (role, id)."""
        ...

    def watch(self) -> AsyncIterator[WatchEvent]:
        """Replay the live records as "put" events, then yield each change as it happens.

        Survives store outages: after a reconnect the watcher resynchronises, yielding
        "delete" for records that vanished meanwhile and "put" for new or changed ones.
        Stop it with `aclose()` (or by leaving an `async for` loop and closing it)."""
        ...

    async def close(self) -> None:
        """Deregister every registration made through this object, end its watches and
        release connections (idempotent)."""
        ...


def validate_ttl(ttl_s: float) -> float:
    try:
        ttl = float(ttl_s)
    except (TypeError, ValueError) as exc:
        raise DiscoveryConfigError(f"ttl_s must be a number, got {ttl_s!r}") from exc
    if not ttl >= 1.0:
        raise DiscoveryConfigError(f"ttl_s must be >= 1 second, got {ttl_s!r}")
    return ttl


def validate_role(role: str | None) -> None:
    if role is not None and role not in ROLES:
        raise DiscoveryConfigError(f"role {role!r} must be one of {ROLES} or None")


def sort_records(records: list[WorkerRecord]) -> list[WorkerRecord]:
    return sorted(records, key=lambda r: (r.role, r.id))


def diff_records(old: dict[str, WorkerRecord], new: dict[str, WorkerRecord]) -> list[WatchEvent]:
    """Events that turn membership `old` into `new` (both keyed by storage key):
    deletes first, then puts for new or changed records."""
    events = [WatchEvent("delete", rec) for key, rec in old.items() if key not in new]
    events += [WatchEvent("put", rec) for key, rec in new.items() if old.get(key) != rec]
    return events
