"""`local` connector: starts and drains `splitserve worker` processes of a deployment on this host.

The workers are counted in the deployment's discovery, so those `splitserve serve` started
count too; the connector starts `splitserve worker --role R --port 0 --discovery URL
<worker flags>` child processes to scale up and SIGTERMs workers to scale down (a worker
deregisters, drains its running requests and exits 0; SIGKILL after `stop_timeout_s`).
Lifecycle, counting and ordering are shared with the `ray` connector: see `workers.py`.

Scale-down stops its own children first. Workers it did not start (found by command line,
or by the owner pid of their `embedded://` registration file) are stopped only with
`stop_external`, off by default: `splitserve serve` ends the whole deployment when one of
its own decode workers exits. Children die with the planner even if it is SIGKILLed
(parent-death signal), and `close()` drains them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from splitserve.planner.connectors.workers import ROLES, WorkerPoolConfig, WorkerPoolConnector
from splitserve.planner.connectors.workers import flag_value as _flag
from splitserve.runtime.process import ChildProcess

log = logging.getLogger(__name__)

__all__ = ["LocalConnector", "LocalConnectorConfig", "ROLES", "find_worker_pid", "pid_alive"]


@dataclass(frozen=True)
class LocalConnectorConfig(WorkerPoolConfig):
    """How the local connector finds, starts and stops the workers of one deployment
    (fields of `WorkerPoolConfig`, plus the ones below)."""

    #: Also SIGTERM workers it did not start (found by their command line or their discovery
    #: file's owner pid) when its own are not enough to scale down. Off by default:
    #: `splitserve serve` stops the whole deployment when one of its own decode workers exits.
    stop_external: bool = False
    #: Address its workers bind (a free port each).
    host: str = "127.0.0.1"
    #: argv prefix that runs the `splitserve` CLI; None: this interpreter with
    #: `-m splitserve.runtime.cli` (tests substitute a stand-in worker).
    command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.command is not None:
            if isinstance(self.command, (str, bytes)) or not self.command:
                raise ValueError("command must be a non-empty sequence of strings")
            object.__setattr__(self, "command", tuple(str(x) for x in self.command))


class _WorkerProcess(ChildProcess):
    """A child `splitserve worker` as a `WorkerHandle`: nothing here blocks."""

    def take_ready(self) -> bool:
        while self.ready_event is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return False
            if event.get("event") == "ready":
                self.ready_event = event
        return True


@dataclass
class _External:
    """A worker it did not start, SIGTERMed to scale down."""

    pid: int
    since: float
    killed: bool = False


class LocalConnector(WorkerPoolConnector):
    """Resizes the worker pools of a deployment on this host by starting and stopping processes.

    `LocalConnector(LocalConnectorConfig(...))`, or the config's fields as keywords (what
    `create_connector("local", discovery_url=..., ...)` passes).
    """

    kind = "local"

    def __init__(self, config: LocalConnectorConfig | None = None, **fields: Any) -> None:
        if config is None:
            config = LocalConnectorConfig(**fields)
        elif fields:
            raise TypeError("pass either a LocalConnectorConfig or its fields, not both")
        self.config: LocalConnectorConfig = config
        #: Workers it did not start that it is stopping, by worker id.
        self._external: dict[str, _External] = {}
        super().__init__(config)

    def _launch(self, role: str, worker_id: str) -> _WorkerProcess:
        cfg = self.config
        command = list(cfg.command) if cfg.command else [sys.executable, "-m", "splitserve.runtime.cli"]
        argv = [*command, *cfg.worker_argv(role, worker_id, cfg.host)]
        return _WorkerProcess(worker_id, argv, env={**os.environ, **cfg.worker_env()}).start()

    def _stop_external(self, role: str, n: int, candidates: list[str], records: dict[str, Any]) -> list[str]:
        if not self.config.stop_external:
            return super()._stop_external(role, n, candidates, records)
        stopped: list[str] = []
        for wid in candidates:
            if len(stopped) == n:
                break
            pid = find_worker_pid(wid, role, self.config.discovery_url)
            if pid is None:
                log.warning("local: cannot find the process of %s worker %s; leaving it", role, wid)
                continue
            log.info("local: stopping %s worker %s (pid %d, not started by this connector)", role, wid, pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            self._external[wid] = _External(pid, time.monotonic())
            stopped.append(wid)
        return stopped

    def _external_stopped(self, worker_id: str) -> bool | None:
        ext = self._external.get(worker_id)
        if ext is None or pid_alive(ext.pid):
            return False
        del self._external[worker_id]
        return True

    def _check_external(self, now: float) -> None:
        for wid, ext in self._external.items():
            if not ext.killed and now - ext.since > self.config.stop_timeout_s:
                log.warning("local: worker %s (pid %d) still draining after %.0fs; killing it",
                            wid, ext.pid, self.config.stop_timeout_s)
                ext.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ext.pid, signal.SIGKILL)


# ---------------------------------------------------------------- finding other workers
def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_worker(argv: list[str] | None, role: str, discovery_url: str) -> bool:
    return (
        argv is not None
        and "worker" in argv
        and (_flag(argv, "--role") or "decode") == role
        and _flag(argv, "--discovery") == discovery_url
    )


def _embedded_owner(worker_id: str, role: str, discovery_url: str) -> int | None:
    """Owner pid of an `embedded://` registration file, if it lives on this host."""
    if urllib.parse.urlsplit(discovery_url).scheme != "embedded":
        return None
    from splitserve.runtime.discovery.embedded import EmbeddedConfig

    try:
        directory = EmbeddedConfig.from_url(discovery_url).directory
        with open(directory / f"{role}.{worker_id}.json", "rb") as f:
            owner = json.loads(f.read()).get("owner") or {}
    except (OSError, ValueError):
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return None
    return pid


def find_worker_pid(worker_id: str, role: str, discovery_url: str) -> int | None:
    """The pid of the `splitserve worker` process registered as `worker_id`, or None.

    Looks for a process whose command line is a worker of this role and discovery URL with
    `--worker-id worker_id`; for `embedded://` discovery also takes the registration file's
    owner pid when that process is such a worker (workers started without `--worker-id`).
    Linux only (/proc); elsewhere None.
    """
    me = os.getpid()
    owner = _embedded_owner(worker_id, role, discovery_url)
    if owner is not None and owner != me and _is_worker(_cmdline(owner), role, discovery_url):
        return owner
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        argv = _cmdline(int(entry))
        if _is_worker(argv, role, discovery_url) and _flag(argv, "--worker-id") == worker_id:  # type: ignore[arg-type]
            return int(entry)
    return None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
