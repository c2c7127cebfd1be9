"""The `local` connector against stand-in workers: real processes and real (embedded)
discovery, no model. The stand-in speaks the `splitserve worker` protocol: it registers,
prints the ready line, and on SIGTERM deregisters, drains for a moment and exits 0.
Behaviour knobs come from the environment the connector hands its children.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from splitserve.planner.connectors import CONNECTORS, Connector, ConnectorError, create_connector
from splitserve.planner.connectors.local import (
    LocalConnector,
    LocalConnectorConfig,
    _flag,
    find_worker_pid,
    pid_alive,
)
from splitserve.planner.types import Decision

FAKE_WORKER = textwrap.dedent(
    """
    import argparse, asyncio, json, os, signal, socket, sys, time

    from splitserve.runtime.discovery import WorkerRecord, open_discovery

    async def main():
        p = argparse.ArgumentParser()
        p.add_argument("--role", default="decode")
        p.add_argument("--worker-id", required=True)
        p.add_argument("--discovery", required=True)
        p.add_argument("--num-threads", default=None)
        args, _ = p.parse_known_args()
        if os.environ.get("FAKE_FAIL"):
            sys.exit(3)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if os.environ.get("FAKE_IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:  # "loading the model"; a SIGTERM meanwhile ends it before it registers
            await asyncio.wait_for(stop.wait(), float(os.environ.get("FAKE_LOAD_S", "0")))
            return
        except asyncio.TimeoutError:
            pass
        disc = await open_discovery(args.discovery)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await disc.register(WorkerRecord(id=args.worker_id, role=args.role,
                                         address=f"127.0.0.1:{sock.getsockname()[1]}",
                                         model="fake", block_size=16,
                                         extra={"threads": args.num_threads,
                                                "omp": os.environ.get("OMP_NUM_THREADS")}), ttl_s=5)
        print(json.dumps({"event": "ready", "worker_id": args.worker_id}), flush=True)
        await stop.wait()
        await disc.close()
        await asyncio.sleep(float(os.environ.get("FAKE_DRAIN_S", "0.2")))

    asyncio.run(main())
    """
)


def decision(p: int, d: int) -> Decision:
    return Decision(
        timestamp=0.0, prefill_replicas=p, decode_replicas=d, predicted_rps=1.0, headroom=1.0,
        predicted_isl=100.0, predicted_osl=10.0, wanted_prefill=p, wanted_decode=d,
        prefill_correction=1.0, decode_correction=1.0, feasible=True, reason="test",
    )


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {value!r})")
        time.sleep(0.05)


def list_records(url: str) -> list:
    from splitserve.runtime.discovery import open_discovery

    async def go():
        d = await open_discovery(url)
        try:
            return await d.list()
        finally:
            await d.close()

    return asyncio.run(go())


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return (sys.executable, str(path))


@pytest.fixture
def url(tmp_path) -> str:
    return f"embedded://{tmp_path / 'discovery'}"


@pytest.fixture
def make(fake, url):
    made: list[LocalConnector] = []

    def build(**fields) -> LocalConnector:
        fields = {"discovery_url": url, "command": fake, "log_level": "WARNING", "roles": ("decode",),
                  "monitor_interval_s": 0.05, **fields}
        c = LocalConnector(LocalConnectorConfig(**fields))
        made.append(c)
        return c

    yield build
    for c in made:
        c.close()


@pytest.fixture
def external(fake, url):
    """Start a stand-in worker the connector did not start (like one of `splitserve serve`'s)."""
    procs: list[subprocess.Popen] = []

    def start(worker_id: str = "decode-0", role: str = "decode") -> subprocess.Popen:
        proc = subprocess.Popen([*fake, "worker", "--role", role, "--worker-id", worker_id, "--discovery", url],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        procs.append(proc)
        assert json.loads(proc.stdout.readline())["event"] == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def states(c: LocalConnector) -> list[str]:
    return sorted(w["state"] for w in c.workers())


# ------------------------------------------------------------------ config and registry
def test_config_validation(url):
    cfg = LocalConnectorConfig(discovery_url=url, worker_args=["--dtype", "bfloat16"], roles=["decode"])
    assert cfg.worker_args == ("--dtype", "bfloat16") and cfg.roles == ("decode",)
    assert cfg.min_workers("decode") == 0
    for bad in (
        {"discovery_url": "nowhere"},
        {"discovery_url": url, "roles": ("router",)},
        {"discovery_url": url, "roles": ()},
        {"discovery_url": url, "worker_args": "--dtype bfloat16"},
        {"discovery_url": url, "max_workers": 0},
        {"discovery_url": url, "threads_per_worker": 0},
        {"discovery_url": url, "min_decode_workers": -1},
        {"discovery_url": url, "min_decode_workers": 3, "max_workers": 2},
        {"discovery_url": url, "ready_timeout_s": 0},
        {"discovery_url": url, "command": ()},
    ):
        with pytest.raises(ValueError):
            LocalConnectorConfig(**bad)


def test_registry_builds_local(url):
    assert CONNECTORS["local"] == "splitserve.planner.connectors.local:LocalConnector"
    c = create_connector("local", discovery_url=url)
    try:
        assert isinstance(c, LocalConnector) and isinstance(c, Connector)
        assert c.current() == (0, 0)
    finally:
        c.close()
    with pytest.raises(ConnectorError, match="closed"):
        c.current()
    with pytest.raises(ConnectorError, match="cannot open discovery"):
        LocalConnector(discovery_url="nosuch://x")


# ------------------------------------------------------------------ scaling
def test_counts_external_workers_scales_up_and_down_own(make, external, url, monkeypatch):
    ext = external("decode-0")
    c = make(threads_per_worker=2, worker_args=("--dtype", "bfloat16"))
    assert c.current() == (0, 1)  # the external worker counts
    monkeypatch.setenv("FAKE_LOAD_S", "0.5")
    c.apply(decision(5, 3))  # prefill is not a managed role here: ignored
    assert c.current() == (0, 3)  # loading children count at once
    assert states(c) == ["loading", "loading"]
    wait_for(lambda: states(c) == ["ready", "ready"], what="both children ready")
    records = list_records(url)
    assert sorted(r.id for r in records)[0] == "decode-0" and len(records) == 3
    mine = [r for r in records if r.id != "decode-0"]
    assert all(r.extra == {"threads": "2", "omp": "2"} for r in mine)
    c.apply(decision(0, 3))  # steady: nothing changes
    assert len(c.workers()) == 2

    c.apply(decision(0, 1))
    assert c.current() == (0, 1)  # draining workers no longer count
    wait_for(lambda: c.workers() == [], what="own workers drained and reaped")
    assert [r.id for r in list_records(url)] == ["decode-0"]
    assert ext.poll() is None  # not ours: left alone


def test_never_below_minimum_and_prefers_loading_then_newest(make, monkeypatch):
    c = make(min_decode_workers=1)
    c.apply(decision(0, 2))
    wait_for(lambda: states(c) == ["ready", "ready"])
    first, second = sorted(c.workers(), key=lambda w: int(w["worker_id"].rsplit("-", 1)[1]))
    monkeypatch.setenv("FAKE_LOAD_S", "30")
    c.apply(decision(0, 3))
    loading = [w for w in c.workers() if w["state"] == "loading"]
    assert len(loading) == 1
    c.apply(decision(0, 2))  # the loading one goes first
    assert {w["worker_id"]: w["state"] for w in c.workers()}[loading[0]["worker_id"]] == "stopping"
    c.apply(decision(0, 0))  # min_decode_workers=1 -> stop the newest ready one only
    live = {w["worker_id"]: w["state"] for w in c.workers()}
    assert live[first["worker_id"]] == "ready" and live.get(second["worker_id"]) in ("stopping", None)
    assert c.current() == (0, 1)


def test_external_workers_stopped_only_when_allowed(make, external, url):
    ext = external("decode-0")
    c = make()
    c.apply(decision(0, 0))
    time.sleep(0.3)
    assert ext.poll() is None and c.current() == (0, 1)
    c.close()
    c2 = make(stop_external=True)
    assert find_worker_pid("decode-0", "decode", url) == ext.pid
    c2.apply(decision(0, 0))
    assert c2.current() == (0, 0)
    assert ext.wait(10) == 0  # SIGTERM: deregistered, drained, exit 0
    assert list_records(url) == []


def test_max_workers_caps_scale_up(make, external):
    external("decode-0")
    c = make(max_workers=2)
    c.apply(decision(0, 4))
    assert c.current() == (0, 2) and len(c.workers()) == 1


def test_failed_start_backs_off(make, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    c = make(retry_backoff_s=1.0)
    c.apply(decision(0, 1))
    assert c.current() == (0, 1)
    wait_for(lambda: c.workers() == [], what="failed child reaped")
    assert c.current() == (0, 0)
    c.apply(decision(0, 1))  # within the back-off: no new start
    assert c.workers() == []
    monkeypatch.delenv("FAKE_FAIL")
    time.sleep(1.1)
    c.apply(decision(0, 1))
    wait_for(lambda: states(c) == ["ready"])


def test_ready_timeout_kills(make, monkeypatch):
    monkeypatch.setenv("FAKE_LOAD_S", "60")
    c = make(ready_timeout_s=0.5, retry_backoff_s=60)
    c.apply(decision(0, 1))
    pid = c.workers()[0]["pid"]
    wait_for(lambda: c.workers() == [], timeout=10, what="slow child killed")
    assert not pid_alive(pid)
    c.apply(decision(0, 1))
    assert c.workers() == []  # backing off


def test_drain_timeout_kills_and_close_stops_children(make, monkeypatch):
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    c = make(stop_timeout_s=0.5)
    c.apply(decision(0, 1))
    wait_for(lambda: states(c) == ["ready"])
    pid = c.workers()[0]["pid"]
    c.apply(decision(0, 0))
    wait_for(lambda: not pid_alive(pid), timeout=10, what="stuck worker SIGKILLed")
    monkeypatch.delenv("FAKE_IGNORE_TERM")
    c.apply(decision(0, 2))
    pids = [w["pid"] for w in c.workers()]
    wait_for(lambda: states(c) == ["ready", "ready"])
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 10
    assert not any(pid_alive(p) for p in pids)


def test_flag_and_find_worker_pid(url, external, tmp_path):
    assert _flag(["a", "--role", "prefill", "--role=decode"], "--role") == "decode"
    assert _flag(["--role"], "--role") is None
    proc = external("w-1", role="prefill")
    assert find_worker_pid("w-1", "prefill", url) == proc.pid
    assert find_worker_pid("w-1", "decode", url) is None
    assert find_worker_pid("w-1", "prefill", f"embedded://{tmp_path / 'other'}") is None
    assert pid_alive(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    assert not pid_alive(proc.pid)


# ------------------------------------------------------------------ CLI mapping
def test_cli_local_options(url):
    from splitserve.planner.loop_cli import _connector_options
    from splitserve.runtime.cli import build_parser

    args = build_parser().parse_args([
        "--log-level", "WARNING", "planner", "--ttft-ms", "500", "--itl-ms", "50", "--connector", "local",
        "--metrics-url", "http://127.0.0.1:9/metrics", "--discovery", url, "--dtype", "bfloat16",
        "--kv-cache-memory", "64MiB", "--num-threads", "2", "--max-workers", "3", "--min-decode", "1",
        "--worker-drain-timeout", "5s", "--kv-transport", "grpc",
    ])
    opts = _connector_options(args)
    cfg = LocalConnectorConfig(**opts)
    assert cfg.discovery_url == url and cfg.threads_per_worker == 2 and cfg.max_workers == 3
    assert cfg.roles == ("decode",) and cfg.min_decode_workers == 1 and cfg.stop_timeout_s == 5.0
    assert cfg.log_level == "WARNING"
    flags = list(cfg.worker_args)
    assert flags[flags.index("--dtype") + 1] == "bfloat16"
    assert flags[flags.index("--kv-cache-memory") + 1] == "64MiB"
    assert "--num-threads" not in flags
    assert flags[flags.index("--kv-transport") + 1] == "grpc"
    args.scale_to_zero_after = 60.0
    assert _connector_options(args)["min_decode_workers"] == 0


def test_cli_local_needs_discovery(tmp_path, capsys):
    from splitserve.runtime.cli import main

    from .factories import write_profile

    profile = write_profile(tmp_path / "p.json")
    rc = main(["planner", "--ttft-ms", "500", "--itl-ms", "50", "--connector", "local",
               "--metrics-url", "http://127.0.0.1:9/metrics", "--profile", str(profile)])
    assert rc == 2 and "--discovery" in capsys.readouterr().err
