"""Ray actors that run splitserve processes where Ray places them.

Lifecycle of a `ProcessActor`: Ray places it on a node that has its resources; the
constructor substitutes the node's IP into the argv (`{node_ip}`) and starts the child
(`python -m splitserve.runtime.cli ...`) from a supervisor thread. The child gets a
parent-death signal bound to that thread, which lives exactly as long as the child, so a
killed actor never leaves its process behind. If the child exits while nobody asked it to
stop, the actor exits too (code 1), and Ray restarts the actor (`max_restarts`) — which
starts a fresh child that registers again under the same worker id. `ready()` waits for
the child's ready line; `stop()` sends SIGTERM (a worker deregisters and drains), waits,
then SIGKILLs; the driver then kills the actor for good.

`EtcdActor` runs a single-member etcd on its node (the head) with a private data dir, for
`serve --ray` without `--discovery`; `stop()` ends it and removes the data dir.

Both are plain classes: the driver wraps them with `ray.remote` (Ray is imported lazily).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)

#: Placeholder in a plan's argv, replaced by the IP of the node the actor landed on.
NODE_IP = "{node_ip}"


def _node() -> tuple[str, str]:
    """(node IP, node id) of the Ray node this actor runs on."""
    import ray

    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


def _restarted() -> bool:
    """Whether Ray restarted this actor (its property warns about an API it uses inside)."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _local_host(host: str) -> str:
    """Where a process on this node reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def _http_get(url: str, timeout: float) -> tuple[int, Any]:
    """(status, JSON body or None) of GET url, without proxies; (0, None) if unreachable."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


class ProcessActor:
    """One `splitserve` child process (worker or frontend), supervised on its node."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        from splitserve.runtime.process import ChildProcess, splitserve_argv

        self.name = name
        self.node_ip, self.node_id = _node()
        self.restarted = _restarted()
        argv = splitserve_argv(*(a.replace(NODE_IP, self.node_ip) for a in args))
        self._child = ChildProcess(name, argv, env={**os.environ, **(env or {})})
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"{name}-supervisor",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise RuntimeError(f"{name}: cannot start {argv[:4]}...") from self._start_error
        logger.info("%s%s: pid %s on node %s (%s)", name, " (restarted)" if self.restarted else "",
                    self._child.pid, self.node_ip, self.node_id[:12])

    def __repr__(self) -> str:  # Ray prefixes forwarded log lines with this
        return self.name

    def _supervise(self) -> None:
        try:
            self._child.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        assert self._child.proc is not None
        code = self._child.proc.wait()
        if self._stopping.is_set():
            return
        # Died on its own: take the actor down so Ray restarts it (or marks it dead).
        print(f"[{self.name}] exited unexpectedly with code {code}; ending the actor",
              file=sys.stderr, flush=True)
        os._exit(1)

    def ready(self, timeout: float) -> dict[str, Any]:
        """The child's ready event plus where it runs: node_ip, node_id, pid, restarted."""
        event = self._child.ready_event or self._child.wait_ready(timeout)
        return {**event, "name": self.name, "node_ip": self.node_ip, "node_id": self.node_id,
                "pid": self._child.pid, "restarted": self.restarted}

    def ping(self) -> dict[str, Any]:
        """Cheap liveness: the child's pid (changes when Ray restarted this actor)."""
        return {"pid": self._child.pid, "node_id": self.node_id, "exit_code": self._child.poll()}

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET a path of the child's HTTP server (the frontend) from this node."""
        event = self._child.ready_event
        if not event or "port" not in event:
            return 0, None
        host = _local_host(str(event.get("host", "127.0.0.1")))
        host = f"[{host}]" if ":" in host else host
        return _http_get(f"http://{host}:{event['port']}{path}", timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the child (deregister, drain, exit), SIGKILL after `timeout`; its exit code."""
        self._stopping.set()
        self._child.terminate()
        code = self._child.wait(timeout)
        if code is None:
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            self._child.kill()
            code = self._child.wait(5.0)
        return code


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_etcd() -> str | None:
    """Path of the `etcd` binary on this node, or None."""
    return shutil.which("etcd")


class EtcdActor:
    """A single-member etcd on this node (the Ray head), private data dir, free ports."""

    def __init__(self, ready_timeout: float = 30.0) -> None:
        from splitserve.runtime.process import death_signal_preexec

        binary = find_etcd()
        if binary is None:
            raise RuntimeError("no `etcd` binary on the Ray head node")
        self.node_ip, self.node_id = _node()
        self.data_dir = tempfile.mkdtemp(prefix="splitserve-etcd-")
        host = self.node_ip
        self.client_port, peer_port = _free_port(host), _free_port(host)
        fmt = f"[{host}]" if ":" in host else host
        client, peer = f"http://{fmt}:{self.client_port}", f"http://{fmt}:{peer_port}"
        self.endpoint = f"{fmt}:{self.client_port}"
        self._stopping = threading.Event()
        up = threading.Event()  # healthy once: from then on a death ends the actor
        argv = [binary, "--name", "splitserve", "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"splitserve={peer}", "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]
        started: list[Any] = []
        spawned = threading.Event()

        def supervise() -> None:  # owns the child: its parent-death signal is this thread's
            try:
                with open(os.path.join(self.data_dir, "etcd.log"), "ab") as log:
                    started.append(subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True, preexec_fn=death_signal_preexec(os.getpid())))
            except BaseException as exc:  # noqa: BLE001 - raised by the constructor
                started.append(exc)
                spawned.set()
                return
            spawned.set()
            code = started[0].wait()
            if up.is_set() and not self._stopping.is_set():
                print(f"[etcd] exited unexpectedly with code {code}: {self._log_tail()}",
                      file=sys.stderr, flush=True)
                os._exit(1)

        threading.Thread(target=supervise, name="etcd-supervisor", daemon=True).start()
        spawned.wait()
        if isinstance(started[0], BaseException):
            raise RuntimeError(f"cannot start {binary}") from started[0]
        self._proc: subprocess.Popen = started[0]
        deadline = time.monotonic() + ready_timeout
        while True:
            status, body = _http_get(f"{client}/health", 1.0)
            if status == 200 and isinstance(body, dict) and body.get("health") == "true":
                break
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(f"etcd on {host} did not start: {tail}")
            time.sleep(0.1)
        up.set()
        logger.info("etcd serving on %s (data in %s)", client, self.data_dir)

    def __repr__(self) -> str:
        return "etcd"

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.data_dir, "etcd.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def url(self) -> str:
        """`etcd://HOST:PORT` of this server (the node IP, reachable from other nodes)."""
        return f"etcd://{self.endpoint}"

    def ping(self) -> dict[str, Any]:
        return {"pid": self._proc.pid, "node_id": self.node_id, "exit_code": self._proc.poll()}

    def stop(self, timeout: float = 10.0) -> int | None:
        self._stopping.set()
        proc = self._proc
        code = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(5.0)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return code
