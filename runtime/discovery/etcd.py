"""etcd v3 discovery backend (`etcd://HOST[:PORT][,HOST:PORT...][/NAMESPACE][?timeout=S]`).

Lifecycle of a registration: grant a lease of `ceil(ttl_s)` seconds, put the record's JSON
at `<namespace>/workers/<role>/<id>` attached to that lease, then renew the lease every
`ttl/3` seconds from a background task. A worker killed with SIGKILL stops renewing, so
etcd deletes its key when the lease expires (within the TTL). When etcd is unreachable the
renewal retries quickly; when etcd answers that the lease is gone (it expired during an
outage, or etcd came back with a fresh data dir) the record is put again under a new
lease. `deregister` revokes the lease, which deletes the key at once.

Lifecycle of a watch: read the whole prefix (a snapshot at revision R; the first one is
replayed as "put" events), then follow one watch stream from R+1 with `prev_kv`. When the
stream breaks (etcd restarted or unreachable), reports a compaction or a cancel, or shows
the server's revision or raft term going backwards (etcd lost its data), the watcher
re-reads the prefix, yields the difference from what it had, and watches again. So a
watcher misses no membership change across an etcd restart; short flaps during an outage
collapse into their net effect.

The client is etcd3aio (grpc.aio, works with protobuf 7); see README.md beside this file
for why and for measurements. We build the gRPC channel ourselves so that DNS names work
(etcd3aio's own channel factory only accepts IP literals) and so reconnects after an etcd
restart take well under a second, and we drive the Watch stream ourselves (with the stubs
etcd3aio ships) so that every reconnect goes through the resynchronisation above.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from etcd3aio import EtcdConnectionError, EtcdError, EtcdTransientError, prefix_range_end
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
# the generated etcd stubs etcd3aio ships (pinned: etcd3aio>=0.3,<0.4)
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from splitserve.runtime.aio import wait_event

from .types import (
    DEFAULT_TTL_S,
    DiscoveryConfigError,
    DiscoveryError,
    DiscoveryUnavailableError,
    InvalidRecordError,
    Registration,
    WatchEvent,
    WorkerRecord,
    diff_records,
    sort_records,
    validate_role,
    validate_ttl,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 2379
DEFAULT_NAMESPACE = "/splitserve"

# etcd3aio's watch event types (mvccpb.Event.EventType)
_PUT, _DELETE = 0, 1

# failures of one etcd call (etcd3aio maps UNAVAILABLE/DEADLINE_EXCEEDED to EtcdError
# subclasses and re-raises other gRPC codes as AioRpcError)
_RETRYABLE = (EtcdError, grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError, ConnectionError)
_TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _transient(exc: BaseException) -> bool:
    """Whether waiting could help (etcd down or slow), as opposed to a refused request."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _TRANSIENT_CODES
    return isinstance(exc, (EtcdConnectionError, EtcdTransientError, asyncio.TimeoutError,
                            asyncio.InvalidStateError, ConnectionError))


@dataclass(frozen=True)
class EtcdConfig:
    """Where and how to reach etcd."""

    endpoints: tuple[str, ...]
    """`host:port` of each etcd member; several only as IP literals."""
    namespace: str = DEFAULT_NAMESPACE
    """Key prefix of this deployment; records live under `<namespace>/workers/`."""
    timeout_s: float = 5.0
    """How long `register`/`list` keep retrying an unreachable etcd before raising."""
    retry_backoff_s: float = 0.2
    """First delay between retries (doubles up to `max_backoff_s`)."""
    max_backoff_s: float = 1.0
    """Largest delay between retries and watch reconnects."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise DiscoveryConfigError("etcd discovery needs at least one endpoint")
        if not self.namespace.startswith("/") or self.namespace.endswith("/") or "//" in self.namespace:
            raise DiscoveryConfigError(
                f"etcd namespace {self.namespace!r} must look like '/name' (no trailing slash)"
            )
        if not self.timeout_s > 0 or not self.retry_backoff_s > 0 or self.max_backoff_s < self.retry_backoff_s:
            raise DiscoveryConfigError("etcd timeouts and backoffs must be positive")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdConfig:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "etcd":
            raise DiscoveryConfigError(f"not an etcd:// URL: {url!r}")
        if not parts.netloc:
            raise DiscoveryConfigError(f"etcd URL {url!r} names no host (etcd://HOST:PORT)")
        endpoints = tuple(_endpoint(item) for item in parts.netloc.split(",") if item)
        path = parts.path.rstrip("/")
        kwargs: dict[str, Any] = {"endpoints": endpoints}
        if path:
            kwargs["namespace"] = path
        for name, values in urllib.parse.parse_qs(parts.query, strict_parsing=False).items():
            if name != "timeout":
                raise DiscoveryConfigError(f"unknown etcd URL parameter {name!r} (known: timeout)")
            kwargs["timeout_s"] = _float(values[-1], "timeout")
        for name, value in options.items():
            if name not in ("namespace", "timeout_s", "retry_backoff_s", "max_backoff_s"):
                raise DiscoveryConfigError(f"unknown etcd discovery option {name!r}")
            kwargs[name] = value
        return cls(**kwargs)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise DiscoveryConfigError(f"etcd URL parameter {name}={text!r} is not a number") from exc


def _endpoint(item: str) -> str:
    host, port = item, DEFAULT_PORT
    if item.startswith("["):  # [v6]:port
        end = item.find("]")
        host, rest = item[: end + 1], item[end + 1 :]
        if rest.startswith(":"):
            port = int(rest[1:]) if rest[1:].isdigit() else -1
    elif ":" in item:
        host, _, p = item.rpartition(":")
        port = int(p) if p.isdigit() else -1
    if not host or not 0 < port < 65536:
        raise DiscoveryConfigError(f"bad etcd endpoint {item!r} (want HOST:PORT)")
    return f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _channel_target(endpoints: tuple[str, ...]) -> str:
    if len(endpoints) == 1:
        return f"dns:///{endpoints[0]}"
    hosts = [ep.rpartition(":")[0] for ep in endpoints]
    if not all(_is_ip(h) and ":" not in h.strip("[]") for h in hosts):
        raise DiscoveryConfigError(
            "several etcd endpoints must be IPv4 literals; for DNS names give one name "
            "that resolves to every member (e.g. a Kubernetes Service)"
        )
    return "ipv4:" + ",".join(endpoints)


_CHANNEL_OPTIONS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # reconnect fast after an etcd restart (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class _EtcdRegistration(Registration):
    def __init__(self, record: WorkerRecord, ttl_s: float, key: str) -> None:
        super().__init__(record, ttl_s, key)
        self.lease_id = 0
        """The lease currently holding the key (changes after a re-put)."""
        self._task: asyncio.Task[None] | None = None


class EtcdDiscovery:
    """`Discovery` over an etcd v3 cluster. Create with `await EtcdDiscovery.open(url)`."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._prefix = f"{config.namespace}/workers/"
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._registrations: set[_EtcdRegistration] = set()
        self._closed = asyncio.Event()

    @classmethod
    async def open(cls, url: str, **options: Any) -> EtcdDiscovery:
        self = cls(EtcdConfig.from_url(url, **options))
        self._connect()
        return self

    def _connect(self) -> None:
        target = _channel_target(self.config.endpoints)
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._kv = KVService(self._channel, max_attempts=1)
        self._lease = LeaseService(self._channel, max_attempts=1)

    def __repr__(self) -> str:
        return f"EtcdDiscovery({','.join(self.config.endpoints)}{self.config.namespace})"

    # ---------------------------------------------------------------- helpers
    def _services(self) -> tuple[KVService, LeaseService]:
        if self._closed.is_set() or self._kv is None or self._lease is None:
            raise DiscoveryUnavailableError("this etcd discovery is closed")
        return self._kv, self._lease

    def _key(self, record: WorkerRecord) -> str:
        return f"{self._prefix}{record.role}/{record.id}"

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless closed first; True if closed."""
        return await wait_event(self._closed, seconds)

    async def _retrying(self, what: str, op: Any) -> Any:
        """Run `op()` until it succeeds or `timeout_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        delay = self.config.retry_backoff_s
        while True:
            remaining = deadline - loop.time()
            try:
                return await asyncio.wait_for(op(), max(remaining, 0.05))
            except _RETRYABLE as exc:
                if self._closed.is_set():
                    raise DiscoveryUnavailableError("etcd discovery closed") from exc
                if not _transient(exc):
                    raise DiscoveryError(f"etcd refused {what}: {type(exc).__name__}: {exc}") from exc
                if loop.time() + delay >= deadline:
                    raise DiscoveryUnavailableError(
                        f"etcd at {','.join(self.config.endpoints)} unreachable: {what} failed "
                        f"for {self.config.timeout_s:g}s ({type(exc).__name__}: {exc})"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.max_backoff_s)

    def _decode(self, key: bytes, value: bytes) -> WorkerRecord | None:
        try:
            return WorkerRecord.from_json(value)
        except InvalidRecordError as exc:
            logger.warning("ignoring undecodable discovery record at %r: %s", key, exc)
            return None

    # ---------------------------------------------------------------- register
    async def register(self, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> Registration:
        ttl = math.ceil(validate_ttl(ttl_s))
        self._services()
        reg = _EtcdRegistration(record, float(ttl), self._key(record))
        value = record.to_json()  # validate before touching etcd
        await self._retrying("register", lambda: self._grant_and_put(reg, value))
        reg._task = asyncio.create_task(self._keep_alive(reg, value), name=f"etcd-keepalive-{record.id}")
        self._registrations.add(reg)
        logger.info("registered %s %s at %s (lease %x, ttl %ds)", record.role, record.id, reg.key, reg.lease_id, ttl)
        return reg

    async def _grant_and_put(self, reg: _EtcdRegistration, value: str) -> None:
        kv, lease = self._services()
        timeout = self.config.timeout_s
        granted = await lease.grant(int(reg.ttl_s), timeout=timeout)
        try:
            await kv.put(reg.key, value, lease=granted.ID, timeout=timeout)
        except BaseException:
            with contextlib.suppress(*_RETRYABLE):
                await lease.revoke(granted.ID, timeout=1.0)
            raise
        reg.lease_id = granted.ID

    async def _keep_alive_once(self, lease_id: int) -> int:
        _, lease = self._services()
        call = lease.keep_alive(lease_id)
        try:
            response = await asyncio.wait_for(call.read(), self.config.timeout_s)
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise ConnectionError("lease keep-alive stream closed")
        return int(response.TTL)

    async def _keep_alive(self, reg: _EtcdRegistration, value: str) -> None:
        interval = max(reg.ttl_s / 3.0, 0.2)
        delay = interval
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while not await self._sleep(delay):
            try:
                remaining = await self._keep_alive_once(reg.lease_id)
                if remaining <= 0:
                    logger.warning(
                        "lease %x of %s expired or was lost; registering again", reg.lease_id, reg.record.id
                    )
                    await asyncio.wait_for(self._grant_and_put(reg, value), self.config.timeout_s)
                    logger.info("re-registered %s under lease %x", reg.record.id, reg.lease_id)
                elif failing_since is not None:
                    logger.info("etcd reachable again; %s keeps lease %x", reg.record.id, reg.lease_id)
                failing_since = None
                delay = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the keep-alive must outlive any failure
                if self._closed.is_set():
                    return
                if not isinstance(exc, (*_RETRYABLE, DiscoveryError)):
                    logger.exception("unexpected keep-alive failure of %s", reg.record.id)
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                    logger.warning("keep-alive of %s failed (%s); retrying", reg.record.id, type(exc).__name__)
                    delay = self.config.retry_backoff_s
                else:
                    delay = min(delay * 2, self.config.max_backoff_s, interval)

    async def deregister(self, handle: Registration) -> None:
        if not isinstance(handle, _EtcdRegistration) or handle.closed:
            return
        handle.closed = True
        self._registrations.discard(handle)
        if handle._task is not None:
            handle._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle._task
        if self._lease is not None and handle.lease_id:
            # revoking deletes the key (only while this lease still holds it, so an old
            # handle never removes a newer registration of the same worker)
            try:
                await self._lease.revoke(handle.lease_id, timeout=min(self.config.timeout_s, 2.0))
            except _RETRYABLE as exc:
                logger.warning(
                    "could not revoke lease of %s (%s); it expires within %gs",
                    handle.record.id, type(exc).__name__, handle.ttl_s,
                )
        logger.info("deregistered %s %s", handle.record.role, handle.record.id)

    # ---------------------------------------------------------------- read
    async def _snapshot(self, prefix: str) -> tuple[dict[str, WorkerRecord], Any]:
        kv, _ = self._services()
        resp = await kv.get(prefix, range_end=prefix_range_end(prefix), timeout=self.config.timeout_s)
        records: dict[str, WorkerRecord] = {}
        for item in resp.kvs:
            record = self._decode(item.key, item.value)
            if record is not None:
                records[item.key.decode()] = record
        return records, resp.header

    async def list(self, role: str | None = None) -> list[WorkerRecord]:
        validate_role(role)
        prefix = self._prefix + (f"{role}/" if role else "")
        records, _ = await self._retrying("list", lambda: self._snapshot(prefix))
        return sort_records(list(records.values()))

    async def watch(self) -> AsyncIterator[WatchEvent]:
        known: dict[str, WorkerRecord] = {}
        delay = self.config.retry_backoff_s
        while not self._closed.is_set():
            try:
                snapshot, header = await asyncio.wait_for(self._snapshot(self._prefix), self.config.timeout_s)
            except (*_RETRYABLE, DiscoveryUnavailableError):
                if await self._sleep(delay):
                    return
                delay = min(delay * 2, self.config.max_backoff_s)
                continue
            delay = self.config.retry_backoff_s
            for event in diff_records(known, snapshot):
                yield event
            known = snapshot
            try:
                async for event in self._follow(known, header.revision, header.raft_term):
                    yield event
            except (*_RETRYABLE, DiscoveryUnavailableError) as exc:
                if self._closed.is_set():
                    return
                logger.warning("etcd watch interrupted (%s); resynchronising", type(exc).__name__)
            except asyncio.CancelledError:
                if self._closed.is_set():  # the channel was closed under the stream
                    return
                raise
            if await self._sleep(self.config.retry_backoff_s):
                return

    async def _follow(self, known: dict[str, WorkerRecord], revision: int, term: int) -> AsyncIterator[WatchEvent]:
        """Events after `revision` on one watch stream; returns (or raises) when the
        watcher must resynchronise from a fresh snapshot."""
        if self._channel is None:
            raise DiscoveryUnavailableError("this etcd discovery is closed")
        call = WatchStub(self._channel).Watch()
        try:
            await call.write(WatchRequest(create_request=WatchCreateRequest(
                key=self._prefix.encode(),
                range_end=prefix_range_end(self._prefix),
                start_revision=revision + 1,
                prev_kv=True,
            )))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("etcd closed the watch stream")
                header = response.header
                if response.canceled or response.compact_revision:
                    logger.warning("etcd watch cancelled (compacted at %d)", response.compact_revision)
                    return
                if header.revision and (header.revision < revision or header.raft_term < term):
                    logger.warning("etcd lost its history (revision %d < %d)", header.revision, revision)
                    return
                revision = max(revision, header.revision)
                term = max(term, header.raft_term)
                for event in response.events:
                    key = event.kv.key.decode()
                    if event.type == _PUT:
                        record = self._decode(event.kv.key, event.kv.value)
                        if record is not None and known.get(key) != record:
                            known[key] = record
                            yield WatchEvent("put", record)
                    elif event.type == _DELETE:
                        record = known.pop(key, None)
                        if record is None and event.prev_kv.value:
                            record = self._decode(event.prev_kv.key, event.prev_kv.value)
                        if record is not None:
                            yield WatchEvent("delete", record)
        finally:
            call.cancel()

    # ---------------------------------------------------------------- close
    async def close(self) -> None:
        if self._closed.is_set():
            return
        for reg in list(self._registrations):
            await self.deregister(reg)
        self._closed.set()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=0.2)
