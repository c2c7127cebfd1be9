"""Single-host discovery with no server: a directory of JSON files with heartbeat mtimes.

URL forms:
- `embedded:///abs/path/to/dir`: use that directory;
- `embedded://NAME`: the directory `<tmp>/splitserve-<uid>/<NAME>/discovery`, one per
  deployment name (what `splitserve serve` uses, with a name unique to the deployment);
- `embedded://` with the `deployment=NAME` option: the same as `embedded://NAME`.
There is no fixed default directory, so two deployments on one host never share records.
URL parameter `poll=SECONDS` (or the `poll_interval_s` option) sets the watch poll period.

Lifecycle of a registration: the owner writes `<role>.<id>.json` atomically (a temporary
file, then `os.replace`) holding the record and its TTL, and then touches the file's mtime
every `ttl/3` seconds from a background task (re-writing it if it has disappeared). A
reader treats a file whose mtime is older than its TTL as dead, so a worker killed with
SIGKILL disappears within its TTL; readers delete files dead for two TTLs. `deregister`
removes the file at once (only while it is still the one this owner wrote).

Lifecycle of a watch: scan the directory every poll period (re-reading a file only when
its inode changed, which `os.replace` guarantees on every re-write), and yield the
difference from the previous scan; the first scan replays the live records as "put".
Any number of processes on the host can register, list and watch at once; nothing needs
to be started first, and a crashed process leaves nothing that blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.runtime.aio import wait_event

from .types import (
    DEFAULT_TTL_S,
    DiscoveryConfigError,
    DiscoveryError,
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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SUFFIX = ".json"
_TMP_MAX_AGE_S = 60.0


def default_base_dir() -> Path:
    """Per-user parent of the per-deployment directories: `<tmp>/splitserve-<uid>`."""
    return Path(tempfile.gettempdir()) / f"splitserve-{os.getuid()}"


def deployment_dir(deployment: str, base_dir: Path | None = None) -> Path:
    """The discovery directory of deployment `deployment`."""
    if not _NAME_RE.match(deployment):
        raise DiscoveryConfigError(
            f"deployment name {deployment!r} must be 1-64 chars of letters, digits, '_.-'"
        )
    return (base_dir or default_base_dir()) / deployment / "discovery"


def embedded_url(deployment: str) -> str:
    """The `embedded://` URL of deployment `deployment` (validated)."""
    deployment_dir(deployment)
    return f"embedded://{deployment}"


@dataclass(frozen=True)
class EmbeddedConfig:
    """Where the records live and how often watchers look."""

    directory: Path
    """The deployment's discovery directory (created, mode 0700, if missing)."""
    poll_interval_s: float = 0.2
    """How often a watcher rescans the directory."""

    def __post_init__(self) -> None:
        if not self.directory.is_absolute():
            raise DiscoveryConfigError(f"embedded discovery directory {self.directory} must be absolute")
        if not 0.01 <= self.poll_interval_s <= 60:
            raise DiscoveryConfigError("poll interval must be between 0.01 and 60 seconds")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EmbeddedConfig:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "embedded":
            raise DiscoveryConfigError(f"not an embedded:// URL: {url!r}")
        deployment = options.pop("deployment", None)
        base_dir = options.pop("base_dir", None)
        kwargs: dict[str, Any] = {}
        for name, values in urllib.parse.parse_qs(parts.query).items():
            if name != "poll":
                raise DiscoveryConfigError(f"unknown embedded URL parameter {name!r} (known: poll)")
            try:
                kwargs["poll_interval_s"] = float(values[-1])
            except ValueError as exc:
                raise DiscoveryConfigError(f"poll={values[-1]!r} is not a number") from exc
        for name, value in options.items():
            if name != "poll_interval_s":
                raise DiscoveryConfigError(f"unknown embedded discovery option {name!r}")
            kwargs[name] = float(value)
        if parts.netloc and parts.path not in ("", "/"):
            raise DiscoveryConfigError(
                f"embedded URL {url!r}: use embedded://NAME or embedded:///absolute/dir, not both"
            )
        if parts.path not in ("", "/"):
            directory = Path(urllib.parse.unquote(parts.path))
        else:
            name = parts.netloc or deployment
            if not name:
                raise DiscoveryConfigError(
                    "embedded discovery needs a deployment: embedded://NAME, "
                    "embedded:///absolute/dir, or the deployment= option"
                )
            directory = deployment_dir(name, Path(base_dir) if base_dir else None)
        return cls(directory=directory, **kwargs)


class _FileRegistration(Registration):
    def __init__(self, record: WorkerRecord, ttl_s: float, path: Path) -> None:
        super().__init__(record, ttl_s, str(path))
        self.path = path
        self.inode: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None


@dataclass
class _Cached:
    inode: tuple[int, int]
    record: WorkerRecord | None
    ttl_s: float


class EmbeddedDiscovery:
    """`Discovery` over a local directory. Create with `await EmbeddedDiscovery.open(url)`."""

    def __init__(self, config: EmbeddedConfig) -> None:
        self.config = config
        self.directory = config.directory
        self._registrations: set[_FileRegistration] = set()
        self._closed = asyncio.Event()
        self._cache: dict[str, _Cached] = {}

    @classmethod
    async def open(cls, url: str, **options: Any) -> EmbeddedDiscovery:
        self = cls(EmbeddedConfig.from_url(url, **options))
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self

    def __repr__(self) -> str:
        return f"EmbeddedDiscovery({self.directory})"

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise DiscoveryError("this embedded discovery is closed")

    async def _sleep(self, seconds: float) -> bool:
        return await wait_event(self._closed, seconds)

    # ---------------------------------------------------------------- write
    def _write(self, reg: _FileRegistration) -> None:
        payload = json.dumps(
            {
                "record": reg.record.to_dict(),
                "ttl_s": reg.ttl_s,
                "owner": {"pid": os.getpid(), "host": socket.gethostname()},
            },
            sort_keys=True,
        )
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{reg.path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            st = os.stat(tmp)
            os.replace(tmp, reg.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        reg.inode = (st.st_dev, st.st_ino)

    async def register(self, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> Registration:
        self._check_open()
        ttl = validate_ttl(ttl_s)
        record.to_json()  # validate extra before writing
        reg = _FileRegistration(record, ttl, self.directory / f"{record.role}.{record.id}{_SUFFIX}")
        self._write(reg)
        reg._task = asyncio.create_task(self._heartbeat(reg), name=f"embedded-heartbeat-{record.id}")
        self._registrations.add(reg)
        logger.info("registered %s %s at %s (ttl %gs)", record.role, record.id, reg.path, ttl)
        return reg

    async def _heartbeat(self, reg: _FileRegistration) -> None:
        interval = max(reg.ttl_s / 3.0, 0.1)
        while not await self._sleep(interval):
            try:
                st = os.stat(reg.path)
                if (st.st_dev, st.st_ino) != reg.inode:
                    logger.warning("%s was replaced by another registrant of %s; taking it back",
                                   reg.path, reg.record.id)
                    self._write(reg)
                else:
                    os.utime(reg.path)
            except FileNotFoundError:
                logger.warning("%s disappeared (expired or removed); writing it again", reg.path)
                with contextlib.suppress(OSError):
                    self._write(reg)
            except OSError as exc:
                logger.warning("heartbeat of %s failed: %s", reg.path, exc)

    async def deregister(self, handle: Registration) -> None:
        if not isinstance(handle, _FileRegistration) or handle.closed:
            return
        handle.closed = True
        self._registrations.discard(handle)
        if handle._task is not None:
            handle._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle._task
        try:
            st = os.stat(handle.path)
            if (st.st_dev, st.st_ino) == handle.inode:
                os.unlink(handle.path)
        except FileNotFoundError:
            pass
        logger.info("deregistered %s %s", handle.record.role, handle.record.id)

    # ---------------------------------------------------------------- read
    def _scan(self) -> dict[str, WorkerRecord]:
        """Live records keyed by file name; reaps files dead for two TTLs."""
        now = time.time()
        live: dict[str, WorkerRecord] = {}
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            name = entry.name
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if name.startswith("."):
                if name.endswith(".tmp") and now - st.st_mtime > _TMP_MAX_AGE_S:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            if not name.endswith(_SUFFIX):
                continue
            seen.add(name)
            inode = (st.st_dev, st.st_ino)
            cached = self._cache.get(name)
            if cached is None or cached.inode != inode:
                cached = self._read(entry.path, inode)
                if cached is None:
                    continue
                self._cache[name] = cached
            age = now - st.st_mtime
            if age > 2 * cached.ttl_s:
                self._reap(entry.path, inode, cached.ttl_s)
            elif age <= cached.ttl_s and cached.record is not None:
                live[name] = cached.record
        for name in set(self._cache) - seen:
            del self._cache[name]
        return live

    def _read(self, path: str, inode: tuple[int, int]) -> _Cached | None:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
            return _Cached(inode, WorkerRecord.from_dict(data["record"]), float(data["ttl_s"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, InvalidRecordError) as exc:
            logger.warning("ignoring unreadable discovery file %s: %s", path, exc)
            return _Cached(inode, None, DEFAULT_TTL_S)

    @staticmethod
    def _reap(path: str, inode: tuple[int, int], ttl_s: float) -> None:
        """Delete a file dead for two TTLs, unless it was re-written or touched meanwhile."""
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == inode and time.time() - st.st_mtime > 2 * ttl_s:
                os.unlink(path)
                logger.info("removed expired discovery record %s", path)

    async def list(self, role: str | None = None) -> list[WorkerRecord]:
        validate_role(role)
        self._check_open()
        records = self._scan().values()
        return sort_records([r for r in records if role is None or r.role == role])

    async def watch(self) -> AsyncIterator[WatchEvent]:
        self._check_open()
        known: dict[str, WorkerRecord] = {}
        while True:
            current = self._scan()
            for event in diff_records(known, current):
                yield event
            known = current
            if await self._sleep(self.config.poll_interval_s):
                return

    # ---------------------------------------------------------------- close
    async def close(self) -> None:
        if self._closed.is_set():
            return
        for reg in list(self._registrations):
            await self.deregister(reg)
        self._closed.set()
