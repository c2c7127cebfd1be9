"""`splitserve serve` as a user runs it: one command, the openai client answers, SIGTERM
stops every child and frees the port, a crashed child is reported (exit 1), and children
die with a SIGKILLed parent."""

import os
import signal
import socket
import time

import openai
import pytest

from tests.helpers.serve import start_serve as _start_serve

pytestmark = pytest.mark.live

FLAGS = ["--port", "0", "--dtype", "auto", "--num-threads-per-worker", "1",
         "--kv-cache-memory", "32MiB", "--max-model-len", "512", "--log-level", "WARNING"]


def start_serve(*extra: str):
    """Popen of `splitserve serve`, and the /v1 URL it printed."""
    flags = list(FLAGS)
    i = flags.index("--log-level")
    level = flags[i + 1]
    del flags[i : i + 2]
    return _start_serve(*flags, *extra, log_level=level)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_dead(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def private_dirs() -> set[str]:
    from splitserve.runtime.discovery.embedded import default_base_dir

    base = default_base_dir()
    return {p.name for p in base.glob("serve-*")} if base.exists() else set()


def test_serve_answers_and_sigterm_stops_everything():
    dirs_before = private_dirs()
    proc, url = start_serve()
    try:
        kids = children_of(proc.pid)
        assert len(kids) == 2  # one decode worker + the frontend
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hi!"}])
        assert r.choices[0].message.content
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert wait_dead(kids, 5)
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        assert private_dirs() <= dirs_before  # its private discovery directory is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_crashed_worker_is_reported_and_nothing_is_left():
    proc, url = start_serve()
    try:
        kids = children_of(proc.pid)
        worker = next(p for p in kids if " worker " in cmdline(p))
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(30) == 1
        assert wait_dead(kids, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_children_die_with_a_killed_parent(tmp_path):
    # a SIGKILLed serve cannot clean up: keep its discovery directory in tmp_path
    proc, url = start_serve("--discovery", f"embedded://{tmp_path}/discovery")
    kids = children_of(proc.pid)
    assert kids
    proc.kill()
    proc.wait()
    assert wait_dead(kids, 10)
