"""What the `local` and `ray` connectors share: pools of `splitserve worker` processes that
meet in discovery, counted there and resized by starting and draining workers.

Lifecycle of a `WorkerPoolConnector`:
- build: open the deployment's discovery (the URL its workers register with and its
  frontend watches) on a private event-loop thread. Every child is started and watched from
  that thread (a local child's parent-death signal is tied to the thread that started it,
  so it must be a thread that lives exactly as long as the connector);
- `current()`: the live workers of each role in discovery, whoever started them, plus own
  workers still loading (not registered yet), minus workers being drained or gone;
- `apply(decision)`: for each managed role, scale down first (SIGTERM/stop: own loading
  workers, then the newest ready ones; workers it did not start only where the subclass
  can and is allowed to), then start workers to scale up — never below the configured
  minimums nor above `max_workers`. It returns at once: a monitor task notes each worker's
  ready line, kills one not ready within `ready_timeout_s` (and backs that role off before
  starting another), and kills a draining worker still alive after `stop_timeout_s`. A
  stopped worker deregisters first (the frontend stops picking it), finishes its running
  requests, then exits;
- `close()`: stop every own worker, wait for them to drain, kill the rest, close discovery
  and end the thread. Workers it did not start are left as they are.

A subclass says how to start one worker (`_launch`, returning a `WorkerHandle`) and,
optionally, how to stop workers it did not start (`_stop_external`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Coroutine, Protocol, TypeVar

from splitserve.planner.connectors.base import ConnectorError
from splitserve.planner.types import Decision

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerPoolConfig:
    """Settings every worker-pool connector has (the `local` and `ray` configs extend it)."""

    #: Discovery URL the deployment's workers register with and its frontend watches
    #: (`embedded://NAME`, `etcd://HOST:PORT/NS`): the `--discovery` of `splitserve serve`.
    discovery_url: str
    #: Worker flags of every worker it starts (engine flags `--model`, `--dtype`,
    #: `--kv-cache-memory`, ..., and KV transfer flags). The model must be the frontend's,
    #: or the frontend ignores the worker.
    worker_args: tuple[str, ...] = ()
    #: Torch threads of each worker it starts (`--num-threads` and OMP_NUM_THREADS).
    threads_per_worker: int = 1
    #: Most workers of the deployment (both roles, whoever started them) it lets run.
    max_workers: int = 4
    #: Roles it resizes; the others are counted but left alone (an aggregated deployment
    #: runs decode workers only: they prefill themselves).
    roles: tuple[str, ...] = ROLES
    #: Fewest prefill workers it scales down to.
    min_prefill_workers: int = 0
    #: Fewest decode workers it scales down to.
    min_decode_workers: int = 0
    #: Seconds a started worker may take to print its ready line before it is killed.
    ready_timeout_s: float = 600.0
    #: Seconds a stopped worker may take to drain and exit before it is killed.
    stop_timeout_s: float = 60.0
    #: After a worker of a role fails to start, wait this long before starting another
    #: (doubling on each further failure, up to 8x).
    retry_backoff_s: float = 30.0
    #: `--log-level` of its workers.
    log_level: str = "INFO"
    #: Seconds `current()` / `apply()` may wait on the connector's thread (a discovery read).
    call_timeout_s: float = 30.0
    #: How often the monitor looks at the workers.
    monitor_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.discovery_url, str) or "://" not in self.discovery_url:
            raise ValueError(f"discovery_url must be a discovery URL (embedded://NAME, etcd://...), "
                             f"got {self.discovery_url!r}")
        for name in ("worker_args", "roles"):
            if isinstance(getattr(self, name), (str, bytes)):
                raise ValueError(f"{name} must be a sequence of strings, not a string")
            object.__setattr__(self, name, tuple(str(x) for x in getattr(self, name)))
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

    def worker_argv(self, role: str, worker_id: str, host: str, advertise_host: str | None = None) -> list[str]:
        """`splitserve` arguments (no interpreter) of one worker it starts."""
        adv = ["--advertise-host", advertise_host] if advertise_host else []
        return [
            "--log-level", self.log_level, "worker", "--role", role, "--host", host, *adv,
            "--port", "0", "--worker-id", worker_id, "--discovery", self.discovery_url,
            *self.worker_args, "--num-threads", str(self.threads_per_worker),
        ]

    def worker_env(self) -> dict[str, str]:
        """Environment a started worker gets on top of its launcher's."""
        return {"OMP_NUM_THREADS": str(self.threads_per_worker), "TOKENIZERS_PARALLELISM": "false"}


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` / `--name=VALUE` in argv (the last one wins, as argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


class WorkerHandle(Protocol):
    """One started worker, as the monitor sees it. Every method returns at once."""

    #: Its process id where known (logs only).
    pid: int | None

    def take_ready(self) -> bool:
        """True once the worker printed its ready line (it is registered)."""

    def poll(self) -> int | None:
        """Its exit code once it ended, else None."""

    def terminate(self) -> None:
        """Ask it to deregister, drain and exit."""

    def kill(self) -> None:
        """End it now."""


@dataclass
class _Own:
    worker_id: str
    role: str
    handle: WorkerHandle
    started_at: float
    ready_at: float | None = None
    stopping_at: float | None = None
    killed: bool = False

    @property
    def alive(self) -> bool:
        return self.handle.poll() is None


@dataclass
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0


class WorkerPoolConnector:
    """The Connector protocol over a pool of workers counted in discovery (see the module doc)."""

    #: Name in log lines ("local", "ray").
    kind = "workers"

    def __init__(self, config: WorkerPoolConfig) -> None:
        self.config = config
        self._prefix = f"planner-{os.getpid()}-{secrets.token_hex(2)}"
        self._seq = 0
        self._own: dict[str, _Own] = {}
        #: worker id -> role of workers it did not start that it is stopping.
        self._stopping_external: dict[str, str] = {}
        #: Workers that ended; their records may outlive them by a TTL (killed ones).
        self._gone: set[str] = set()
        #: (role, excess) already warned about, so a held pool does not warn every tick.
        self._warned: set[tuple[str, int]] = set()
        self._backoff = {role: _Backoff() for role in ROLES}
        self._closed = False
        self._disc: Any = None
        self._monitor: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"{self.kind}-connector", daemon=True)
        self._thread.start()
        try:
            self._call(self._open(), timeout=max(config.call_timeout_s, 10.0))
        except BaseException:
            self._shutdown_thread()
            raise

    # ------------------------------------------------------------ subclass hooks
    def _launch(self, role: str, worker_id: str) -> WorkerHandle:
        """Start one worker of `role` registering as `worker_id` (runs on the connector's thread)."""
        raise NotImplementedError

    def _stop_external(self, role: str, n: int, candidates: list[str], records: dict[str, Any]) -> list[str]:
        """Stop up to `n` of `candidates` (ids of workers it did not start); the ids stopped."""
        key = (role, min(n, len(candidates)))
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s pool stays %d above the decision: its other workers were not started "
                        "by this connector", self.kind, role, key[1])
        return []

    def _external_stopped(self, worker_id: str) -> bool | None:
        """Whether an external worker being stopped has ended (None: unknown, keep waiting)."""
        return None

    def _check_external(self, now: float) -> None:
        """Monitor hook for external workers being stopped (kill after the drain timeout)."""

    # ------------------------------------------------------------ the thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise ConnectorError(f"the {self.kind} connector is closed")
        timeout = self.config.call_timeout_s if timeout is None else timeout
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise ConnectorError(f"{self.kind} connector: no answer within {timeout:.0f}s "
                                 f"(discovery {self.config.discovery_url} stuck?)") from None

    async def _open(self) -> None:
        from splitserve.runtime.discovery import DiscoveryError, open_discovery

        try:
            self._disc = await open_discovery(self.config.discovery_url)
        except (DiscoveryError, ValueError, OSError) as exc:
            raise ConnectorError(
                f"{self.kind} connector: cannot open discovery {self.config.discovery_url}: {exc}") from exc
        self._monitor = asyncio.create_task(self._monitor_forever(), name=f"{self.kind}-connector-monitor")

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
        """Start or stop workers towards the decision; returns without waiting for them."""
        self._call(self._apply(decision))

    def close(self) -> None:
        """Stop own workers, wait for them to drain (kill after `stop_timeout_s`), end the thread."""
        if self._closed:
            return
        try:
            self._call(self._close(), timeout=self.config.stop_timeout_s + 20.0)
        except ConnectorError:
            log.warning("%s connector: close did not finish in time; killing own workers", self.kind)
            for own in list(self._own.values()):
                with contextlib.suppress(Exception):
                    own.handle.kill()
        finally:
            self._closed = True
            self._shutdown_thread()

    def workers(self) -> list[dict[str, Any]]:
        """Own workers: worker id, role, pid, state (loading | ready | stopping)."""
        out = []
        for o in list(self._own.values()):
            state = "stopping" if o.stopping_at is not None else "ready" if o.ready_at is not None else "loading"
            out.append({"worker_id": o.worker_id, "role": o.role, "pid": o.handle.pid, "state": state})
        return out

    # ------------------------------------------------------------ on the thread
    async def _records(self) -> list[Any]:
        from splitserve.runtime.discovery import DiscoveryError

        try:
            return await self._disc.list()
        except (DiscoveryError, OSError) as exc:
            raise ConnectorError(f"{self.kind} connector: discovery {self.config.discovery_url}: {exc}") from exc

    async def _census(self, records: list[Any] | None = None) -> dict[str, dict[str, Any]]:
        """role -> {worker id: record or own worker}: the workers that count as existing."""
        self._check()
        if records is None:
            records = await self._records()
        counted: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
        self._gone &= {rec.id for rec in records}
        for rec in records:
            own = self._own.get(rec.id)
            if own is not None and (own.stopping_at is not None or not own.alive):
                continue
            if rec.id in self._stopping_external or rec.id in self._gone:
                continue
            counted[rec.role][rec.id] = rec
        for own in self._own.values():
            if own.stopping_at is None and own.alive:
                counted[own.role].setdefault(own.worker_id, own)
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
                log.info("%s: %s start deferred %.0fs more (the last one failed)", self.kind, role,
                         backoff.retry_at - now)
                continue
            room = cfg.max_workers - total
            if room < missing:
                log.warning("%s: %s wants %d more worker(s) but max_workers=%d allows %d",
                            self.kind, role, missing, cfg.max_workers, max(room, 0))
            for _ in range(max(0, min(missing, room))):
                self._start(role)
                total += 1

    def _start(self, role: str) -> None:
        self._seq += 1
        wid = f"{self._prefix}-{role}-{self._seq}"
        try:
            handle = self._launch(role, wid)
        except Exception as exc:  # noqa: BLE001 - a launch failure is a failed start
            log.warning("%s: cannot start %s worker %s: %s", self.kind, role, wid, exc)
            self._fail(role, time.monotonic())
            return
        self._own[wid] = _Own(wid, role, handle, started_at=time.monotonic())
        log.info("%s: started %s worker %s (pid %s)", self.kind, role, wid, handle.pid)

    def _scale_down(self, role: str, n: int, counted: dict[str, Any], records: list[Any]) -> list[str]:
        """Stop `n` workers of `role`: own loading ones, own newest, then (if allowed) others."""
        own = [o for o in self._own.values() if o.role == role and o.stopping_at is None and o.alive]
        own.sort(key=lambda o: (o.ready_at is not None, -o.started_at))
        stopped: list[str] = []
        now = time.monotonic()
        for o in own[:n]:
            log.info("%s: stopping %s worker %s (pid %s, %s)", self.kind, role, o.worker_id, o.handle.pid,
                     "ready" if o.ready_at is not None else "loading")
            o.stopping_at = now
            o.handle.terminate()
            stopped.append(o.worker_id)
        rest = n - len(stopped)
        others = sorted((wid for wid in counted if wid not in self._own), reverse=True)
        if rest > 0 and others:
            ext = self._stop_external(role, rest, others, {r.id: r for r in records})
            for wid in ext:
                self._stopping_external[wid] = role
            stopped += ext
        return stopped

    def _check(self) -> None:
        cfg = self.config
        now = time.monotonic()
        for o in list(self._own.values()):
            if o.ready_at is None and o.stopping_at is None and o.handle.take_ready():
                o.ready_at = now
                self._backoff[o.role] = _Backoff()
                log.info("%s: %s worker %s ready after %.1fs", self.kind, o.role, o.worker_id, now - o.started_at)
            code = o.handle.poll()
            if code is not None:
                del self._own[o.worker_id]
                self._gone.add(o.worker_id)
                if o.stopping_at is not None:
                    log.info("%s: %s worker %s stopped (exit %s, %.1fs after the stop)",
                             self.kind, o.role, o.worker_id, code, now - o.stopping_at)
                elif o.ready_at is None:
                    log.warning("%s: %s worker %s exited with %s before it was ready",
                                self.kind, o.role, o.worker_id, code)
                    self._fail(o.role, now)
                else:
                    log.warning("%s: %s worker %s exited unexpectedly with %s", self.kind, o.role, o.worker_id, code)
                continue
            if o.ready_at is None and o.stopping_at is None and now - o.started_at > cfg.ready_timeout_s:
                log.warning("%s: %s worker %s not ready after %.0fs; killing it",
                            self.kind, o.role, o.worker_id, cfg.ready_timeout_s)
                o.stopping_at = now
                o.killed = True
                o.handle.kill()
                self._fail(o.role, now)
            elif o.stopping_at is not None and not o.killed and now - o.stopping_at > cfg.stop_timeout_s:
                log.warning("%s: %s worker %s still draining after %.0fs; killing it",
                            self.kind, o.role, o.worker_id, cfg.stop_timeout_s)
                o.killed = True
                o.handle.kill()
        for wid in list(self._stopping_external):
            if self._external_stopped(wid):
                log.info("%s: %s worker %s stopped", self.kind, self._stopping_external.pop(wid), wid)
                self._gone.add(wid)
        self._check_external(now)

    def _fail(self, role: str, now: float) -> None:
        b = self._backoff[role]
        b.failures += 1
        delay = self.config.retry_backoff_s * min(8, 2 ** (b.failures - 1))
        b.retry_at = now + delay
        if delay > 0:
            log.warning("%s: next %s start in %.0fs", self.kind, role, delay)

    async def _monitor_forever(self) -> None:
        while True:
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the monitor must outlive one odd worker
                log.exception("%s connector monitor", self.kind)
            await asyncio.sleep(self.config.monitor_interval_s)

    async def _close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        now = time.monotonic()
        for o in self._own.values():
            if o.stopping_at is None:
                o.stopping_at = now
                o.handle.terminate()
        deadline = now + self.config.stop_timeout_s
        while any(o.alive for o in self._own.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        killed = [o for o in self._own.values() if o.alive]
        for o in killed:
            log.warning("%s: %s worker %s did not drain in time; killing it", self.kind, o.role, o.worker_id)
            o.handle.kill()
        deadline = time.monotonic() + 5.0
        while any(o.alive for o in killed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._own:
            log.info("%s: stopped %d own worker(s)", self.kind, len(self._own))
        self._own.clear()
        if self._disc is not None:
            with contextlib.suppress(Exception):
                await self._disc.close()
            self._disc = None
