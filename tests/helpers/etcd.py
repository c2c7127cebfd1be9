"""A real single-member etcd server for live tests.

Lifecycle: `EtcdServer(data_dir)` picks two free loopback ports (client, peer) once;
`start()` spawns `etcd` with a private data dir and waits until `/health` answers;
`stop()` sends SIGTERM (SIGKILL after a grace period); `start()` again reuses the same
ports and data dir, so a test can restart etcd "in place" and check that clients
reconnect. `ensure_etcd_binary()` finds `etcd` on PATH, or runs
`scripts/install-test-services.sh` once (Debian's `etcd-server`), or returns None so the
caller can skip with a clear reason.

Use it from a folder's own conftest::

    from tests.helpers.etcd import etcd_server_fixture
    etcd_server = etcd_server_fixture("etcd_server", scope="session")
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-test-services.sh"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_etcd_binary(try_install: bool = True) -> str | None:
    """Path of the `etcd` binary, installing Debian's etcd-server if allowed; else None."""
    found = shutil.which("etcd")
    if found or not try_install or not INSTALL_SCRIPT.exists():
        return found
    try:
        subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("etcd")


class EtcdServer:
    """One etcd process on loopback; restartable on the same ports and data dir."""

    def __init__(self, base_dir: Path | str, *, binary: str = "etcd", host: str = "127.0.0.1") -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.binary = binary
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """`host:port` of the client listener."""
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """A discovery URL for splitserve (`etcd://host:port`)."""
        return f"etcd://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            self.binary,
            "--name", "splitserve-test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"splitserve-test={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            # small and quick on a shared 2-core machine
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--snapshot-count", "5000",
        ]

    def start(self, timeout_s: float = 20.0) -> None:
        if self.running:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout_s}s: {self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1.0) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self, grace_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def etcd_server_fixture(name: str = "etcd_server", scope: str = "function"):
    """A pytest fixture called `name` that yields a started `EtcdServer` and stops it.

    Skips (with the reason) only when `etcd` is not installed and cannot be installed.
    """
    import pytest

    @pytest.fixture(name=name, scope=scope)
    def _etcd_server(tmp_path_factory):
        binary = ensure_etcd_binary()
        if binary is None:
            pytest.skip(
                "etcd is not installed and scripts/install-test-services.sh could not install "
                "Debian's etcd-server (needs root and apt)"
            )
        server = EtcdServer(tmp_path_factory.mktemp("etcd"), binary=binary)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    return _etcd_server
