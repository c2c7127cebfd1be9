"""The `ray` connector.

Fast tests: a fake `ray` module (actor methods run on a thread pool, `ray.wait(timeout=0)`
sees whether they finished) and a fake `ProcessActor` that runs the stand-in worker of
test_local_connector.py, so the handle's state machine (ready, ping, stop, kill) runs
against real processes and real (embedded) discovery without Ray.

Live test: a one-node Ray cluster of its own, the real `ProcessActor` (runtime/ray/actors.py)
and a real `splitserve worker` bound to loopback: start one, see it register, drain it. (Ray's
own daemons bind the machine's address whatever we ask, as test_ray_multinode.py notes.)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from splitserve.planner.connectors import Connector, ConnectorError
from splitserve.planner.connectors.ray import RayConnector, RayConnectorConfig
from splitserve.runtime.process import ChildProcess

from .test_local_connector import FAKE_WORKER, decision, list_records, states, wait_for

# The connector places workers with the actors and resources of `serve --ray` (runtime/ray/).
pytest.importorskip("splitserve.runtime.ray.placement")


class _Ref:
    def __init__(self, future):
        self.future = future


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        h = self.handle

        def call():
            if h.killed:
                raise RuntimeError("RayActorError: the actor is dead")
            return getattr(h.instance, self.name)(*args)

        return _Ref(h.ray.pool.submit(call))


class _Handle:
    def __init__(self, ray, instance):
        self.ray, self.instance, self.killed = ray, instance, False

    def __getattr__(self, name):
        return _Method(self, name)


class _ActorClass:
    def __init__(self, ray, cls, options=None):
        self.ray, self.cls, self.opts = ray, cls, options or {}

    def options(self, **kw):
        return _ActorClass(self.ray, self.cls, kw)

    def remote(self, *args):
        handle = _Handle(self.ray, self.cls(*args))
        self.ray.created.append((self.opts, args, handle))
        return handle


class FakeRay:
    """The part of the `ray` API the connector uses."""

    def __init__(self, resources=None, initialized=True, fail_init=False):
        self.resources = resources or {"CPU": 4.0}
        self.initialized = initialized
        self.fail_init = fail_init
        self.init_kwargs = None
        self.created: list = []
        self.pool = ThreadPoolExecutor(8)

    def is_initialized(self):
        return self.initialized

    def init(self, **kw):
        if self.fail_init:
            raise ConnectionError("no cluster")
        self.init_kwargs, self.initialized = kw, True

    def shutdown(self):
        self.initialized = False

    def cluster_resources(self):
        return dict(self.resources)

    def remote(self, cls):
        return _ActorClass(self, cls)

    def wait(self, refs, num_returns=1, timeout=None):
        done = [r for r in refs if r.future.done()]
        return done, [r for r in refs if r not in done]

    def get(self, ref):
        return ref.future.result()

    def kill(self, handle, no_restart=True):
        handle.killed = True
        handle.instance.kill()


def fake_actor_class(command):
    class FakeProcessActor:
        """ProcessActor's methods over the stand-in worker (`{node_ip}` -> loopback)."""

        def __init__(self, name, args, env):
            self.args = list(args)
            argv = [*command, *(a.replace("{node_ip}", "127.0.0.1") for a in args)]
            self.child = ChildProcess(name, argv, env={**os.environ, **env}).start()

        def ready(self, timeout):
            return {**self.child.wait_ready(timeout), "pid": self.child.pid, "node_ip": "127.0.0.1"}

        def ping(self):
            return {"pid": self.child.pid, "exit_code": self.child.poll()}

        def stop(self, timeout):
            self.child.terminate()
            code = self.child.wait(timeout)
            if code is None:
                self.child.kill()
                code = self.child.wait(5)
            return code

        def kill(self):
            self.child.kill()
            self.child.wait(5)

    return FakeProcessActor


@pytest.fixture
def fake_cmd(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return (sys.executable, str(path))


@pytest.fixture
def url(tmp_path) -> str:
    return f"embedded://{tmp_path / 'discovery'}"


@pytest.fixture
def make(fake_cmd, url):
    made = []

    def build(ray=None, **fields):
        ray = ray or FakeRay({"CPU": 4.0, "splitserve_decode": 2.0})
        fields = {"discovery_url": url, "log_level": "WARNING", "roles": ("decode",),
                  "monitor_interval_s": 0.05, **fields}
        c = RayConnector(RayConnectorConfig(**fields), ray_module=ray, actor_class=fake_actor_class(fake_cmd))
        made.append(c)
        return c, ray

    yield build
    for c in made:
        c.close()


def test_config():
    cfg = RayConnectorConfig(discovery_url="etcd://10.0.0.1:2379")
    assert cfg.host == "{node_ip}" and cfg.max_restarts == 0 and cfg.address is None
    with pytest.raises(ValueError):
        RayConnectorConfig(discovery_url="etcd://x:1", max_restarts=-1)
    with pytest.raises(ValueError):
        RayConnectorConfig(discovery_url="etcd://x:1", host="")


def test_scale_up_places_actors_and_drains_them(make, url):
    c, ray = make(threads_per_worker=2, worker_args=("--dtype", "auto"))
    assert isinstance(c, Connector) and c.current() == (0, 0)
    c.apply(decision(3, 2))
    assert c.current() == (0, 2)
    wait_for(lambda: states(c) == ["ready", "ready"], what="both actors' workers ready")
    assert sorted(r.role for r in list_records(url)) == ["decode", "decode"]
    opts, (name, args, env), _ = ray.created[0]
    assert opts == {"max_restarts": 0, "max_task_retries": 0, "max_concurrency": 4, "num_cpus": 2.0,
                    "num_gpus": 0.0, "resources": {"splitserve_decode": 1.0}}
    assert args[args.index("--host") + 1] == "{node_ip}" == args[args.index("--advertise-host") + 1]
    assert args[args.index("--worker-id") + 1] == name and args[args.index("--discovery") + 1] == url
    assert args[args.index("--num-threads") + 1] == "2" and env["OMP_NUM_THREADS"] == "2"
    assert all(w["pid"] for w in c.workers())  # learned from ready()

    c.apply(decision(0, 1))
    assert c.current() == (0, 1)
    wait_for(lambda: len(c.workers()) == 1, what="one worker drained")
    newest = ray.created[1][2]
    assert newest.killed and newest.instance.child.poll() == 0  # drained, exit 0, actor killed
    assert len(list_records(url)) == 1
    c.close()
    assert ray.created[0][2].killed and list_records(url) == []
    assert ray.initialized  # the caller's Ray is left connected


def test_failed_start_and_death_after_ready(make, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    c, ray = make(retry_backoff_s=60)
    c.apply(decision(0, 1))
    wait_for(lambda: c.workers() == [], what="failed worker noticed")
    assert ray.created[0][2].killed and c.current() == (0, 0)
    c.apply(decision(0, 1))
    assert len(ray.created) == 1  # backing off
    c.close()

    monkeypatch.delenv("FAKE_FAIL")
    c2, ray2 = make()
    c2.apply(decision(0, 1))
    wait_for(lambda: states(c2) == ["ready"])
    ray2.created[0][2].instance.child.kill()  # the process dies on its own
    wait_for(lambda: c2.workers() == [], what="death noticed by ping")
    assert c2.current() == (0, 0)  # its record (SIGKILLed, still in discovery) no longer counts
    c2.apply(decision(0, 1))  # replaced at once: not a start failure
    assert len(ray2.created) == 2


def test_connects_and_disconnects_when_ray_is_not_initialised(make):
    c, ray = make(ray=FakeRay(initialized=False), address="ray://head:10001", namespace="ns")
    assert ray.init_kwargs["address"] == "ray://head:10001" and ray.init_kwargs["namespace"] == "ns"
    c.close()
    assert not ray.initialized
    with pytest.raises(ConnectorError, match="cannot connect to Ray"):
        RayConnector(discovery_url="etcd://x:1", ray_module=FakeRay(initialized=False, fail_init=True))


def test_cli_ray_options(url):
    from splitserve.planner.loop_cli import _connector_options
    from splitserve.runtime.cli import build_parser

    args = build_parser().parse_args([
        "planner", "--ttft-ms", "500", "--itl-ms", "50", "--connector", "ray", "--metrics-url",
        "http://127.0.0.1:9/metrics", "--discovery", "etcd://10.0.0.1:2379", "--ray-address", "auto",
        "--worker-roles", "prefill,decode", "--device", "cuda", "--ray-max-restarts", "2",
    ])
    cfg = RayConnectorConfig(**_connector_options(args))
    assert cfg.address == "auto" and cfg.roles == ("prefill", "decode") and cfg.max_restarts == 2
    assert cfg.worker_args[cfg.worker_args.index("--device") + 1] == "cuda"
    args.discovery = None
    with pytest.raises(ValueError, match="--discovery"):
        _connector_options(args)


# ------------------------------------------------------------------ live, on a real Ray
@pytest.mark.live
@pytest.mark.slow
def test_ray_connector_live(tmp_path):
    ray = pytest.importorskip("ray")
    try:
        from splitserve.engine.model_loader import default_model_path

        default_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model not installed: {exc}")
    url = f"embedded://{tmp_path / 'discovery'}"  # one node: a directory serves as discovery
    ray_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray's socket paths have a limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.1",
             _temp_dir=ray_dir)
    c = None
    try:
        c = RayConnector(RayConnectorConfig(
            discovery_url=url, roles=("decode",), log_level="WARNING", ready_timeout_s=120, stop_timeout_s=30,
            host="127.0.0.1",  # one node: the worker stays on loopback (Ray maps its node IP off it)
            worker_args=("--dtype", "auto", "--kv-cache-memory", "64MiB", "--max-model-len", "512"),
        ))
        c.apply(decision(0, 1))
        assert c.current() == (0, 1)
        wait_for(lambda: states(c) == ["ready"], timeout=150, what="worker actor ready")
        (rec,) = list_records(url)
        assert rec.role == "decode" and rec.address.startswith("127.0.0.1:")
        pid = c.workers()[0]["pid"]
        c.apply(decision(0, 0))
        assert c.current() == (0, 0)
        wait_for(lambda: c.workers() == [], timeout=60, what="worker drained")
        assert list_records(url) == []
        from splitserve.planner.connectors.local import pid_alive

        assert not pid_alive(pid)
    finally:
        if c is not None:
            c.close()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
