"""`splitserve serve --ray` on a two-node Ray cluster on this machine.

The live test starts a Ray head (custom resources `splitserve_frontend` and
`splitserve_decode`) and a second Ray node (`splitserve_prefill`), each a `ray start
--block` child with its own temp dir and free ports, then serves with one prefill and one
decode worker meeting in a real etcd. It checks through Ray's state API that the prefill
worker runs on the second node and the decode worker and frontend on the head, completes
chat requests with the `openai` client, SIGKILLs the decode worker's process and sees Ray
restart it, then stops serve (SIGTERM), then both Ray nodes, and checks that no process of
the cluster or of the deployment is left.

Ray resolves a loopback node address to this machine's IP (`resolve_ip_for_localhost`)
and its own daemons bind every interface, so unlike the other live tests this one is not
loopback-only: the workers bind and advertise the node IP, as they would across machines.
The fast tests check the plan (`runtime/ray/placement.py`) without Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from argparse import Namespace
from pathlib import Path

import pytest

from tests.helpers.serve import health, skip_without_model
from splitserve.runtime.ray.actors import NODE_IP
from splitserve.runtime.ray.placement import (
    actor_resources,
    placement_warnings,
    plan_processes,
    worker_args_for_ray,
)

RAY_START_TIMEOUT_S = 90.0
SERVE_TIMEOUT_S = 150.0
ENGINE = ["--dtype", "auto", "--num-threads", "1", "--kv-cache-memory", "256MiB",
          "--max-model-len", "512"]


# -- the plan, without Ray ----------------------------------------------------------------

def serve_args(*argv: str) -> Namespace:
    from splitserve.runtime.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_plan_places_roles_and_binds_the_node_ip():
    args = serve_args("--ray", "--prefill-workers", "1", "--num-threads", "2", "--port", "0")
    assert args.ray == ""  # --ray without ADDRESS
    total = {"CPU": 4, "splitserve_frontend": 1, "splitserve_decode": 1, "splitserve_prefill": 1}
    specs = {s.name: s for s in plan_processes(args, "etcd://10.0.0.1:2379", total)}
    assert list(specs) == ["frontend", "decode-0", "prefill-0"]
    fe, dec, pre = specs["frontend"], specs["decode-0"], specs["prefill-0"]
    assert fe.resources.options() == {"num_cpus": 0.0, "num_gpus": 0.0,
                                      "resources": {"splitserve_frontend": 1.0}}
    assert dec.resources.options() == {"num_cpus": 2.0, "num_gpus": 0.0,
                                       "resources": {"splitserve_decode": 1.0}}
    assert pre.resources.resources == {"splitserve_prefill": 1.0} and pre.role == "prefill"
    assert dec.env["OMP_NUM_THREADS"] == "2"
    for spec in (dec, pre):
        a = list(spec.args)
        assert a[a.index("--host") + 1] == NODE_IP == a[a.index("--advertise-host") + 1]
        assert a[a.index("--discovery") + 1] == "etcd://10.0.0.1:2379"
        assert "127.0.0.1" not in a
        assert not a[0].endswith("python") and "-m" not in a[:2]  # each node its own interpreter


def test_gpu_workers_and_roles_missing_from_the_cluster():
    args = serve_args("--ray", "auto", "--device", "cuda")
    assert args.ray == "auto"
    res = actor_resources("decode", args, {"CPU": 8, "GPU": 2})
    assert (res.num_gpus, res.num_cpus, dict(res.resources)) == (1.0, 1.0, {})
    assert actor_resources("decode", serve_args("--ray"), {"CPU": 8, "GPU": 1}).num_gpus == 1.0
    assert actor_resources("decode", serve_args("--ray", "--device", "cpu"), {"GPU": 1}).num_gpus == 0
    specs = plan_processes(serve_args("--ray", "--decode-workers", "2"), "etcd://h:1", {"CPU": 2,
                           "splitserve_decode": 1})
    notes = placement_warnings(specs, {"CPU": 2, "splitserve_decode": 1})
    assert any("splitserve_frontend" in n and "any node" in n for n in notes)
    assert any("2 decode processes" in n for n in notes)


def test_worker_args_for_ray_adds_or_replaces_hosts():
    assert worker_args_for_ray(["worker", "--role", "decode"]) == [
        "worker", "--host", NODE_IP, "--advertise-host", NODE_IP, "--role", "decode"]
    assert worker_args_for_ray(["--log-level", "INFO", "worker", "--host", "127.0.0.1",
                                "--advertise-host", "x"]) == [
        "--log-level", "INFO", "worker", "--host", NODE_IP, "--advertise-host", NODE_IP]


# -- processes ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ppid_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(*roots: int) -> set[int]:
    """`roots` and every process below them, now."""
    kids, out, todo = _ppid_map(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += kids.get(pid, [])
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != os.getpid() and text in cmdline(int(e)) and alive(int(e))]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(interval_s)
    return time.monotonic() - start


class RayNode:
    """One `ray start --block` child: its own temp dir, free ports, stopped by pid."""

    def __init__(self, temp_dir: Path, *, head_address: str | None, resources: dict,
                 env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.log_path = temp_dir.with_suffix(".log")
        self.gcs_port = free_port() if head_address is None else None
        self.dashboard_port = free_port() if head_address is None else None
        argv = [str(Path(sys.executable).with_name("ray")), "start", "--block",
                "--num-cpus", "1", "--resources", json.dumps(resources),
                "--temp-dir", str(temp_dir), "--object-store-memory", str(100 * 1024 * 1024),
                "--dashboard-agent-listen-port", "0", "--metrics-export-port", str(free_port()),
                "--disable-usage-stats"]
        if head_address is None:
            argv += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port())]
        else:
            argv += ["--address", head_address]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_started(self, timeout_s: float = RAY_START_TIMEOUT_S) -> None:
        def started() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}: {self.log()[-3000:]}")
            return "Ray runtime started" in self.log()
        wait_for(started, timeout_s, "ray start")

    def stop(self, timeout_s: float = 30.0) -> set[int]:
        """SIGTERM `ray start --block` (it ends its node's processes); SIGKILL stragglers."""
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in tree:
            if alive(pid) and pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return tree


def ray_env() -> dict[str, str]:
    """Environment of every process of the test cluster: token auth with a private token.

    Ray turns token auth on for `ray start --head` when ~/.ray/auth_token exists (any local
    `ray.init()` writes one) but not for `ray start --address`, so an unset mode breaks the
    second node on such a machine; an explicit mode and token make it independent of ~.
    """
    import secrets

    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_state(address: str, env: dict[str, str]) -> dict:
    """Nodes and actors as Ray's state API reports them (queried from a child process, so
    this test process keeps no Ray client state)."""
    code = (
        "import json, sys\n"
        "from ray.util.state import list_actors, list_nodes\n"
        "a = sys.argv[1]\n"
        "nodes = [dict(id=n.node_id, ip=n.node_ip, head=n.is_head_node,\n"
        "              resources=n.resources_total) for n in list_nodes(address=a)]\n"
        "actors = [dict(name=x.name, node_id=x.node_id, pid=x.pid, state=x.state,\n"
        "               num_restarts=x.num_restarts)\n"
        "          for x in list_actors(address=a, detail=True)]\n"
        "print(json.dumps(dict(nodes=nodes, actors=actors)))\n")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_cluster():
    """A Ray head (frontend + decode resources) and a second node (prefill resource)."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("Ray is not installed (pip install 'splitserve[ray]')")
    # short paths: Ray puts unix sockets under the temp dir (108-byte limit)
    base = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
    env = ray_env()
    nodes: list[RayNode] = []
    try:
        head = RayNode(base / "head", head_address=None, env=env,
                       resources={"splitserve_frontend": 1, "splitserve_decode": 1})
        nodes.append(head)
        head.wait_started()
        nodes.append(RayNode(base / "node2", head_address=head.address, env=env,
                             resources={"splitserve_prefill": 1}))
        yield nodes, env
    finally:
        for node in reversed(nodes):
            node.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)




def prefill_counts(url: str) -> tuple[float, float, float]:
    """(remote, local, fallback) prefills the frontend's /metrics counted."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern + r"\S*\s+([0-9.e+-]+)$", text, re.M))
    return (total(r'^splitserve_prefill_decisions_total\{kind="remote"\}'),
            total(r'^splitserve_prefill_decisions_total\{kind="local"\}'),
            total(r"^splitserve_prefill_fallbacks_total"))


# -- the live test ------------------------------------------------------------------------

@pytest.mark.live
@pytest.mark.slow
def test_serve_on_two_ray_nodes(ray_cluster, etcd_server, tmp_path):
    skip_without_model()
    import openai

    (head, node2), env = ray_cluster
    namespace = f"ray-{uuid.uuid4().hex[:10]}"  # marks every process of this deployment
    discovery = f"{etcd_server.url}/{namespace}"
    out_path = tmp_path / "serve.out"
    with open(out_path, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "splitserve.runtime.cli", "--log-level", "INFO", "serve",
             "--ray", head.address, "--prefill-workers", "1", "--decode-workers", "1",
             "--discovery", discovery, "--port", "0", "--ready-timeout", str(SERVE_TIMEOUT_S),
             "--ray-max-restarts", "2", "--max-local-prefill-tokens", "0", *ENGINE],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**env, "OMP_NUM_THREADS": "1"})
    try:
        node2.wait_started()  # joins while serve connects; prefill-0 waits for it

        def output() -> str:
            return out_path.read_text(errors="replace")

        def serving() -> bool:
            if serve.poll() is not None:
                pytest.fail(f"serve exited with {serve.returncode}:\n{output()[-6000:]}")
            return re.search(r"serving .* at (http://\S+)/v1", output()) is not None
        took = wait_for(serving, SERVE_TIMEOUT_S + 30, "serve --ray prints its URL", 0.5)
        print(f"serve --ray ready after {took:.1f}s")
        base = re.search(r"serving .* at (http://\S+)/v1", output()).group(1)
        status, body = health(base)
        assert status == 200 and body["workers"]["decode"] == 1 and body["workers"]["prefill"] == 1

        # Placement, as Ray's state API reports it.
        state = ray_state(head.address, env)
        head_id = next(n["id"] for n in state["nodes"] if n["head"])
        node2_id = next(n["id"] for n in state["nodes"] if "splitserve_prefill" in n["resources"])
        assert head_id != node2_id
        actors = {a["name"]: a for a in state["actors"] if a["state"] == "ALIVE"}
        assert actors["prefill-0"]["node_id"] == node2_id
        assert actors["decode-0"]["node_id"] == head_id
        assert actors["frontend"]["node_id"] == head_id

        # Workers advertise the node IP, not loopback (they may sit on another machine).
        ip = state["nodes"][0]["ip"]
        assert re.search(rf"decode-0@{re.escape(ip)}\b", output())
        assert re.search(rf"prefill-0@{re.escape(ip)}\b", output())

        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        prompts = ["Hi!", "What is the capital of France? " * 8, "Name three colors."]
        for prompt in prompts:
            r = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
            assert r.choices[0].message.content and r.usage.completion_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m", max_tokens=8, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Say hello."}]) if c.choices)
        assert text
        # every prompt was prefilled on prefill-0 (the other node), its KV pulled by decode-0
        remote, local, fallbacks = prefill_counts(base)
        assert (remote, local, fallbacks) == (len(prompts) + 1, 0, 0)

        # Ray restarts a worker whose process died; it registers again and serves.
        decode_actor = actors["decode-0"]
        child = next(p for p in descendants(decode_actor["pid"])
                     if "splitserve.runtime.cli" in cmdline(p) and " worker " in cmdline(p))
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: "decode-0 was restarted by Ray" in output(), 90,
                 "serve logs the restart of decode-0")
        wait_for(lambda: health(base)[1].get("workers", {}).get("decode") == 1, 60,
                 "the restarted decode worker registers again")
        actors = {a["name"]: a for a in ray_state(head.address, env)["actors"]
                  if a["state"] == "ALIVE"}
        assert actors["decode-0"]["num_restarts"] >= 1
        assert actors["decode-0"]["node_id"] == head_id
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi again"}])
        assert r.choices[0].message.content
        assert serve.poll() is None

        deployment = descendants(*(a["pid"] for a in actors.values()))
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, output()[-4000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
    # every process of the deployment is gone once serve returned, before Ray stops
    wait_for(lambda: not processes_mentioning(namespace), 15, "deployment processes exit")
    trees = [node.stop() for node in (node2, head)]
    left = [p for tree in trees for p in tree | deployment if alive(p)]
    assert not left, [(p, cmdline(p)) for p in left]
    assert not processes_mentioning(str(head.temp_dir.parent))
