"""Local child processes: spawn, wait for their ready line, watch, stop — and never orphan them.

Lifecycle of a child: `spawn()` starts it in its own session (so a terminal's Ctrl-C
reaches only the parent, which then stops the children in order) with a parent-death
signal (Linux `PR_SET_PDEATHSIG`: SIGKILL if the parent dies without cleaning up); a reader
thread takes JSON event lines (`{"event": "ready", ...}`) off its stdout and echoes every
other line prefixed with the child's name; `wait_ready()` returns the ready event or raises
`ChildFailed` if the child exits first; `stop_all()` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child exited (or never became ready)."""

    def __init__(self, name: str, returncode: int | None, message: str = "") -> None:
        text = message or (
            f"{name} exited with code {returncode}" if returncode is not None else f"{name} failed"
        )
        super().__init__(text)
        self.name = name
        self.returncode = returncode


def death_signal_preexec(parent_pid: int):
    """preexec_fn: die with the parent (Linux); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ChildProcess:
    """One child process with a name, its events and its exit code."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
                 echo: IO[str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.echo = echo if echo is not None else sys.stdout
        self.proc: subprocess.Popen | None = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader: threading.Thread | None = None
        self.ready_event: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "ChildProcess":
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # logs go straight to our stderr
            env=self.env,
            start_new_session=True,
            preexec_fn=death_signal_preexec(os.getpid()),
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_stdout, name=f"{self.name}-stdout",
                                        daemon=True)
        self._reader.start()
        logger.debug("started %s (pid %s): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            stripped = line.strip()
            if stripped.startswith("{") and '"event"' in stripped:
                try:
                    event = json.loads(stripped)
                except ValueError:
                    event = None
                if isinstance(event, dict) and "event" in event:
                    self._events.put(event)
                    continue
            try:
                self.echo.write(f"[{self.name}] {line}")
                self.echo.flush()
            except (OSError, ValueError):
                pass

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait_ready(self, timeout: float, cancelled: threading.Event | None = None) -> dict[str, Any]:
        """Block until the child prints its ready event; ChildFailed if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                event = None
            if event is not None:
                if event.get("event") == "ready":
                    self.ready_event = event
                    return event
                continue
            code = self.poll()
            if code is not None:
                raise ChildFailed(self.name, code,
                                  f"{self.name} exited with code {code} before it was ready")
            if cancelled is not None and cancelled.is_set():
                raise ChildFailed(self.name, None, f"stopped while waiting for {self.name}")
            if time.monotonic() > deadline:
                raise ChildFailed(self.name, None, f"{self.name} not ready after {timeout:.0f}s")

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class ProcessGroup:
    """Children started together and stopped together (reverse start order)."""

    def __init__(self) -> None:
        self.children: list[ChildProcess] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> ChildProcess:
        child = ChildProcess(name, argv, env=env).start()
        self.children.append(child)
        return child

    def wait_all_ready(self, timeout: float, cancelled: threading.Event | None = None) -> None:
        """Block until every child printed its ready event; ChildFailed as soon as any exits."""
        deadline = time.monotonic() + timeout
        pending = [c for c in self.children if c.ready_event is None]
        while pending:
            for child in list(pending):
                try:
                    child.wait_ready(0.0, cancelled)
                    pending.remove(child)
                    logger.info("%s is ready", child.name)
                except ChildFailed as exc:
                    if exc.returncode is not None or (cancelled is not None and cancelled.is_set()):
                        raise
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise ChildFailed(pending[0].name, None, f"not ready after {timeout:.0f}s: {names}")

    def first_exited(self, ignore: "set[str] | frozenset[str]" = frozenset()) -> ChildProcess | None:
        """The first child (not named in `ignore`) that has exited, or None."""
        for child in self.children:
            if child.name not in ignore and child.poll() is not None:
                return child
        return None

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (newest first), wait up to `timeout`, SIGKILL the rest."""
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.wait(max(0.0, deadline - time.monotonic())) is None:
                logger.warning("%s did not stop within %.0fs; killing it", child.name, timeout)
                child.kill()
                child.wait(5.0)


def splitserve_argv(*args: str) -> list[str]:
    """argv that runs `splitserve <args>` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "splitserve.runtime.cli", *args]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """(stop, signals): SIGINT/SIGTERM set `stop` and are appended to `signals` while inside;
    the previous handlers come back on exit."""
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, signals
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serving_banner(model: str, url: str, decode: int, prefill: int, where: str = "") -> str:
    """The line `splitserve serve` prints once it serves (tools wait for it)."""
    pools = f"{decode} decode worker{'s' if decode != 1 else ''}"
    if prefill:
        pools += f", {prefill} prefill worker{'s' if prefill != 1 else ''}"
    return f"splitserve: serving {model} at {url}/v1 ({pools}{where}); Ctrl-C to stop"


def check_serve_args(args: Any) -> str | None:
    """What is wrong with `serve`'s pool and router flags (local and Ray alike), or None."""
    if args.decode_workers < 1:
        return "--decode-workers must be >= 1"
    if getattr(args, "prefill_workers", 0) < 0:
        return "--prefill-workers must be >= 0"
    from splitserve.frontend.routing import router_config_from_args

    try:
        router_config_from_args(args)
    except ValueError as exc:
        return str(exc)
    return None
