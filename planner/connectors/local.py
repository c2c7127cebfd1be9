"""`local` connector: starts and stops `splitserve worker` processes of a deployment on this host.

Lifecycle:
- build: open the deployment's discovery (the URL its workers register with, e.g. the
  `--discovery` of `splitserve serve`) on a private event-loop thread. That thread also
  spawns and watches every child: a child's parent-death signal is tied to the thread that
  started it, so it must be a thread that lives exactly as long as the connector;
- `current()`: the live workers of each role in discovery, whoever started them, plus own
  children still loading (not registered yet), minus workers being drained;
- `apply(decision)`: for each managed role, start `splitserve worker --role R --port 0
  --discovery URL <engine flags>` processes to scale up, or SIGTERM workers to scale down —
  own children first (loading ones, then the newest), workers it did not start only with
  `stop_external` — never below the configured minimums nor above `max_workers`. It returns
  at once: a monitor task notes each child's ready line, kills a child not ready within
  `ready_timeout_s` (and backs that role off before trying again), and SIGKILLs a drained
  worker still alive after `stop_timeout_s`. A SIGTERMed worker deregisters first (the
  frontend stops picking it), finishes its running requests, then exits;
- `close()`: SIGTERM every own child, wait for them to drain, SIGKILL the rest, close
  discovery and end the thread. Workers it did not start are left as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Coroutine, TypeVar

from splitserve.planner.connectors.base import ConnectorError
from splitserve.planner.types import Decision
from splitserve.runtime.process import ChildProcess

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
T = TypeVar("T")


@dataclass(frozen=True)
class LocalConnectorConfig:
    """How the local connector finds, starts and stops the workers of one deployment."""

    #: Discovery URL the deployment's workers register with and its frontend watches
    #: (`embedded://NAME`, `etcd://HOST:PORT/NS`): the `--discovery` of `splitserve serve`.
    discovery_url: str
    #: Engine flags of every worker it starts (`--model`, `--dtype`, `--kv-cache-memory`,
    #: `--max-model-len`, ...). The model must be the frontend's, or the frontend ignores it.
    worker_args: tuple[str, ...] = ()
    #: Torch threads of each worker it starts (`--num-threads` and OMP_NUM_THREADS).
    threads_per_worker: int = 1
    #: Most worker processes of the deployment (both roles, whoever started them) it lets run.
    max_workers: int = 4
    #: Roles it resizes; the others are counted but left alone (`splitserve serve` runs
    #: decode workers only: aggregated, they prefill themselves).
    roles: tuple[str, ...] = ROLES
    #: Fewest prefill workers it scales down to.
    min_prefill_workers: int = 0
    #: Fewest decode workers it scales down to.
    min_decode_workers: int = 0
    #: Also SIGTERM workers it did not start (found by their command line or their discovery
    #: file's owner pid) when its own are not enough to scale down. Off by default:
    #: `splitserve serve` stops the whole deployment when one of its own workers exits.
    stop_external: bool = False
    #: Address its workers bind (a free port each).
    host: str = "127.0.0.1"
    #: Seconds a started worker may take to print its ready line before it is killed.
    ready_timeout_s: float = 600.0
    #: Seconds a SIGTERMed worker may take to drain and exit before it is SIGKILLed.
    stop_timeout_s: float = 60.0
    #: After a worker of a role fails to start, wait this long before starting another
    #: (doubling on each further failure, up to 8x).
    retry_backoff_s: float = 30.0
    #: `--log-level` of its workers.
    log_level: str = "INFO"
    #: argv prefix that runs the `splitserve` CLI; None: this interpreter with
    #: `-m splitserve.runtime.cli` (tests substitute a stand-in worker).
    command: tuple[str, ...] | None = None
    #: Seconds `current()` / `apply()` may wait on the connector's thread (a discovery read).
    call_timeout_s: float = 30.0
    #: How often the monitor looks at the children.
    monitor_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.discovery_url, str) or "://" not in self.discovery_url:
            raise ValueError(f"discovery_url must be a discovery URL (embedded://NAME, etcd://...), "
                             f"got {self.discovery_url!r}")
        for name in ("worker_args", "roles"):
            if isinstance(getattr(self, name), (str, bytes)):
                raise ValueError(f"{name} must be a sequence of strings, not a string")
            object.__setattr__(self, name, tuple(str(x) for x in getattr(self, name)))
        if self.command is not None:
            if isinstance(self.command, (str, bytes)) or not self.command:
                raise ValueError("command must be a non-empty sequence of strings")
            object.__setattr__(self, "command", tuple(str(x) for x in self.command))
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {self.roles!r}")
        for name in ("threads_per_worker", "max_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("min_prefill_workers", "min_decode_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if sum(self.min_workers(r) for r in self.roles) > self.max_workers:
            raise ValueError("max_workers is below the minimum pools")
        for name in ("ready_timeout_s", "stop_timeout_s", "call_timeout_s", "monitor_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.retry_backoff_s >= 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.retry_backoff_s!r}")

    def min_workers(self, role: str) -> int:
        return self.min_prefill_workers if role == "prefill" else self.min_decode_workers


class _WorkerProcess(ChildProcess):
    """A child `splitserve worker`; `take_ready()` looks for its ready line without blocking."""

    def take_ready(self) -> dict[str, Any] | None:
        while self.ready_event is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return None
            if event.get("event") == "ready":
                self.ready_event = event
        return self.ready_event


@dataclass
class _Child:
    worker_id: str
    role: str
    proc: _WorkerProcess
    started_at: float
    ready_at: float | None = None
    stopping_at: float | None = None
    killed: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class _External:
    """A worker it did not start, SIGTERMed to scale down."""

    worker_id: str
    role: str
    pid: int
    stopping_at: float
    killed: bool = False


@dataclass
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0
    warned: set[str] = field(default_factory=set)


class LocalConnector:
    """Resizes the worker pools of a deployment on this host by starting and stopping processes.

    `LocalConnector(LocalConnectorConfig(...))`, or the config's fields as keywords (what
    `create_connector("local", discovery_url=..., ...)` passes).
    """

    def __init__(self, config: LocalConnectorConfig | None = None, **fields: Any) -> None:
        if config is None:
            config = LocalConnectorConfig(**fields)
        elif fields:
            raise TypeError("pass either a LocalConnectorConfig or its fields, not both")
        self.config = config
        self._prefix = f"planner-{os.getpid()}-{secrets.token_hex(2)}"
        self._seq = 0
        self._children: dict[str, _Child] = {}
        self._external: dict[str, _External] = {}
        #: Own workers that exited; their records may outlive them by a TTL (SIGKILL).
        self._gone: set[str] = set()
        self._backoff = {role: _Backoff() for role in ROLES}
        self._closed = False
        self._disc: Any = None
        self._monitor: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="local-connector", daemon=True)
        self._thread.start()
        try:
            self._call(self._open(), timeout=max(config.call_timeout_s, 10.0))
        except BaseException:
            self._shutdown_thread()
            raise

    # ------------------------------------------------------------ the thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise ConnectorError("the local connector is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self.config.call_timeout_s if timeout is None else timeout)
        except FutureTimeout:
            fut.cancel()
            raise ConnectorError(f"local connector: no answer within {timeout or self.config.call_timeout_s:.0f}s "
                                 f"(discovery {self.config.discovery_url} stuck?)") from None

    async def _open(self) -> None:
        from splitserve.runtime.discovery import DiscoveryError, open_discovery

        try:
            self._disc = await open_discovery(self.config.discovery_url)
        except (DiscoveryError, ValueError, OSError) as exc:
            raise ConnectorError(f"local connector: cannot open discovery {self.config.discovery_url}: {exc}") from exc
        self._monitor = asyncio.create_task(self._monitor_forever(), name="local-connector-monitor")

    def _shutdown_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    # ------------------------------------------------------------ Connector
    def current(self) -> tuple[int, int]:
        """(prefill, decode) workers that exist now: registered ones and own loading ones."""
        counted = self._call(self._census())
        return len(counted["prefill"]), len(counted["decode"])

    def apply(self, decision: Decision) -> None:
        """Start or SIGTERM workers towards the decision; returns without waiting for them."""
        self._call(self._apply(decision))

    def close(self) -> None:
        """SIGTERM own workers, wait for them to drain (SIGKILL after `stop_timeout_s`), stop."""
        if self._closed:
            return
        try:
            self._call(self._close(), timeout=self.config.stop_timeout_s + 15.0)
        except ConnectorError:
            log.warning("local connector: close did not finish in time; killing own workers")
            for child in list(self._children.values()):
                child.proc.kill()
        finally:
            self._closed = True
            self._shutdown_thread()

    # ------------------------------------------------------------ introspection (tests, logs)
    def workers(self) -> list[dict[str, Any]]:
        """Own children: worker id, role, pid, state (loading | ready | stopping)."""
        out = []
        for c in list(self._children.values()):
            state = "stopping" if c.stopping_at is not None else "ready" if c.ready_at is not None else "loading"
            out.append({"worker_id": c.worker_id, "role": c.role, "pid": c.proc.pid, "state": state})
        return out

    # ------------------------------------------------------------ on the thread
    async def _records(self) -> list[Any]:
        from splitserve.runtime.discovery import DiscoveryError

        try:
            return await self._disc.list()
        except (DiscoveryError, OSError) as exc:
            raise ConnectorError(f"local connector: discovery {self.config.discovery_url}: {exc}") from exc

    async def _census(self, records: list[Any] | None = None) -> dict[str, dict[str, Any]]:
        """role -> {worker id: record or own child}: the workers that count as existing."""
        self._check_children()
        if records is None:
            records = await self._records()
        counted: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
        self._gone &= {rec.id for rec in records}
        for rec in records:
            child = self._children.get(rec.id)
            if child is not None and (child.stopping_at is not None or not child.alive):
                continue
            if rec.id in self._external or rec.id in self._gone:
                continue
            counted[rec.role][rec.id] = rec
        for child in self._children.values():
            if child.stopping_at is None and child.alive:
                counted[child.role].setdefault(child.worker_id, child)
        return counted

    async def _apply(self, decision: Decision) -> None:
        cfg = self.config
        records = await self._records()
        counted = await self._census(records)
        want = {
            role: max(cfg.min_workers(role), int(getattr(decision, f"{role}_replicas")))
            for role in cfg.roles
        }
        # Scale down first, so a rebalance frees room under max_workers for the other pool.
        for role, n in want.items():
            have = len(counted[role])
            if n < have:
                for wid in self._scale_down(role, have - n, counted[role], records):
                    counted[role].pop(wid, None)
        total = sum(len(v) for v in counted.values())
        now = time.monotonic()
        for role, n in want.items():
            missing = n - len(counted[role])
            if missing <= 0:
                continue
            backoff = self._backoff[role]
            if now < backoff.retry_at:
                log.info("local: %s start deferred %.0fs more (last start failed)", role, backoff.retry_at - now)
                continue
            room = cfg.max_workers - total
            if room < missing:
                log.warning("local: %s wants %d more worker(s) but max_workers=%d allows %d",
                            role, missing, cfg.max_workers, max(room, 0))
            for _ in range(max(0, min(missing, room))):
                self._spawn(role)
                total += 1

    def _spawn(self, role: str) -> _Child:
        cfg = self.config
        self._seq += 1
        wid = f"{self._prefix}-{role}-{self._seq}"
        command = list(cfg.command) if cfg.command else [sys.executable, "-m", "splitserve.runtime.cli"]
        argv = [
            *command, "--log-level", cfg.log_level, "worker", "--role", role, "--host", cfg.host,
            "--port", "0", "--worker-id", wid, "--discovery", cfg.discovery_url,
            *cfg.worker_args, "--num-threads", str(cfg.threads_per_worker),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads_per_worker), "TOKENIZERS_PARALLELISM": "false"}
        proc = _WorkerProcess(wid, argv, env=env).start()
        child = _Child(wid, role, proc, started_at=time.monotonic())
        self._children[wid] = child
        log.info("local: started %s worker %s (pid %s)", role, wid, proc.pid)
        return child

    def _scale_down(self, role: str, n: int, counted: dict[str, Any], records: list[Any]) -> list[str]:
        """SIGTERM `n` workers of `role`: own loading ones, own newest, then (opt-in) others."""
        own = [c for c in self._children.values() if c.role == role and c.stopping_at is None and c.alive]
        own.sort(key=lambda c: (c.ready_at is not None, -c.started_at))
        stopped: list[str] = []
        now = time.monotonic()
        for child in own[:n]:
            log.info("local: stopping %s worker %s (pid %s, %s)", role, child.worker_id, child.proc.pid,
                     "ready" if child.ready_at is not None else "loading")
            child.stopping_at = now
            child.proc.terminate()
            stopped.append(child.worker_id)
        rest = n - len(stopped)
        if rest <= 0:
            return stopped
        others = sorted((wid for wid in counted if wid not in self._children), reverse=True)
        if not self.config.stop_external:
            if others:
                log.warning("local: %s pool stays %d above the decision: its other workers were not "
                            "started by this connector (stop_external is off)", role, min(rest, len(others)))
            return stopped
        by_id = {r.id: r for r in records}
        for wid in others:
            if rest == 0:
                break
            pid = find_worker_pid(wid, role, self.config.discovery_url, by_id.get(wid))
            if pid is None:
                log.warning("local: cannot find the process of %s worker %s; leaving it", role, wid)
                continue
            log.info("local: stopping %s worker %s (pid %d, not started by this connector)", role, wid, pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            self._external[wid] = _External(wid, role, pid, now)
            stopped.append(wid)
            rest -= 1
        return stopped

    def _check_children(self) -> None:
        cfg = self.config
        now = time.monotonic()
        for child in list(self._children.values()):
            if child.ready_at is None and child.stopping_at is None and child.proc.take_ready() is not None:
                child.ready_at = now
                self._backoff[child.role] = _Backoff()
                log.info("local: %s worker %s ready after %.1fs", child.role, child.worker_id,
                         now - child.started_at)
            code = child.proc.poll()
            if code is not None:
                del self._children[child.worker_id]
                self._gone.add(child.worker_id)
                if child.stopping_at is not None:
                    log.info("local: %s worker %s stopped (exit %s, %.1fs after SIGTERM)",
                             child.role, child.worker_id, code, now - child.stopping_at)
                elif child.ready_at is None:
                    log.warning("local: %s worker %s exited with %s before it was ready",
                                child.role, child.worker_id, code)
                    self._fail(child.role, now)
                else:
                    log.warning("local: %s worker %s exited unexpectedly with %s", child.role, child.worker_id, code)
                continue
            if child.ready_at is None and child.stopping_at is None and now - child.started_at > cfg.ready_timeout_s:
                log.warning("local: %s worker %s not ready after %.0fs; killing it",
                            child.role, child.worker_id, cfg.ready_timeout_s)
                child.stopping_at = now
                child.killed = True
                child.proc.kill()
                self._fail(child.role, now)
            elif child.stopping_at is not None and not child.killed and now - child.stopping_at > cfg.stop_timeout_s:
                log.warning("local: %s worker %s still draining after %.0fs; killing it",
                            child.role, child.worker_id, cfg.stop_timeout_s)
                child.killed = True
                child.proc.kill()
        for ext in list(self._external.values()):
            if not pid_alive(ext.pid):
                del self._external[ext.worker_id]
                self._gone.add(ext.worker_id)
                log.info("local: %s worker %s (pid %d) stopped", ext.role, ext.worker_id, ext.pid)
            elif not ext.killed and now - ext.stopping_at > cfg.stop_timeout_s:
                ext.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ext.pid, signal.SIGKILL)

    def _fail(self, role: str, now: float) -> None:
        b = self._backoff[role]
        b.failures += 1
        delay = self.config.retry_backoff_s * min(8, 2 ** (b.failures - 1))
        b.retry_at = now + delay
        if delay > 0:
            log.warning("local: next %s start in %.0fs", role, delay)

    async def _monitor_forever(self) -> None:
        while True:
            try:
                self._check_children()
            except Exception:  # noqa: BLE001 - the monitor must outlive one odd child
                log.exception("local connector monitor")
            await asyncio.sleep(self.config.monitor_interval_s)

    async def _close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        now = time.monotonic()
        for child in self._children.values():
            if child.stopping_at is None:
                child.stopping_at = now
                child.proc.terminate()
        deadline = now + self.config.stop_timeout_s
        while any(c.alive for c in self._children.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for child in self._children.values():
            if child.alive:
                log.warning("local: %s worker %s did not drain in time; killing it", child.role, child.worker_id)
                child.proc.kill()
            child.proc.wait(5.0)
        if self._children:
            log.info("local: stopped %d own worker(s)", len(self._children))
        self._children.clear()
        if self._disc is not None:
            with contextlib.suppress(Exception):
                await self._disc.close()
            self._disc = None


# ---------------------------------------------------------------- finding other workers
def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` / `--name=VALUE` in argv (the last one wins, as argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


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


def find_worker_pid(worker_id: str, role: str, discovery_url: str, record: Any = None) -> int | None:
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
