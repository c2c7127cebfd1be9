"""Start `splitserve serve` as a user would (a real process tree on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest


def skip_without_model() -> None:
    try:
        from splitserve.engine.model_loader import default_model_path

        default_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model not installed: {exc}")


def start_serve(*flags: str, log_level: str = "WARNING", timeout: float = 300.0):
    """Popen of `splitserve serve FLAGS`, and the /v1 URL it printed."""
    skip_without_model()
    argv = [sys.executable, "-m", "splitserve.runtime.cli", "--log-level", log_level, "serve", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving .* at (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    pytest.fail("splitserve serve did not print its URL")


def health(url: str) -> tuple[int, dict]:
    """(status, body) of GET url/health, straight to loopback (no proxy); (0, {}) when
    nothing answers."""
    import json
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/health", timeout=2) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


def stop_serve(proc, timeout: float = 60.0) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
