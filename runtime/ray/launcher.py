"""The driver of `splitserve serve --ray [ADDRESS]`.

Lifecycle: connect to the Ray cluster (`ray.init(ADDRESS)`; no address: the cluster of
RAY_ADDRESS or of this machine, else a new local one) under a private namespace. Pick
discovery: `--discovery` if given (it must cross nodes: `etcd://`), else an etcd that an
`EtcdActor` runs on the head node, or fail at once if the head has no `etcd`. Create one
`ProcessActor` per process of the plan (frontend, decode and prefill workers), each asking
for its role's resource and CPUs or a GPU, restartable (`max_restarts`). Wait for every
ready line, then for the frontend's /health to count every worker, and print the URL.
Then watch: an actor Ray restarted is logged; one that is dead for good (its restarts used
up) stops everything with exit 1 — except a prefill worker while decode workers remain,
since they prefill locally. Ctrl-C or SIGTERM stops every child (frontend first, so no new
requests arrive; workers deregister and drain), ends etcd, kills the actors and exits 0.
The actors are owned by this driver: if it dies anyway, Ray ends them, and their children
die with them (parent-death signal).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from splitserve.runtime.process import check_serve_args, serving_banner, stop_on_signals
from splitserve.runtime.ray.placement import ProcessSpec, placement_warnings, plan_processes

logger = logging.getLogger("splitserve.serve.ray")

#: Restarts Ray grants each process's actor unless --ray-max-restarts says otherwise.
DEFAULT_MAX_RESTARTS = 3


class ServeFailed(RuntimeError):
    """The deployment cannot come up or went down; the message says why."""


@dataclass
class Placed:
    """A process of the plan and its actor."""

    spec: ProcessSpec
    actor: Any
    info: dict[str, Any] | None = None  # its last ready() answer
    pid: int | None = None
    dead: bool = False


def _ray_errors():
    import ray.exceptions as rex

    died = getattr(rex, "ActorDiedError", rex.RayActorError)
    unavailable = getattr(rex, "ActorUnavailableError", ())
    return died, unavailable, rex.RayActorError, rex.RayError


class RayDeployment:
    """The actors of one `serve --ray`; `start()`, `watch()`, then always `teardown()`."""

    def __init__(self, args: argparse.Namespace, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        restarts = getattr(args, "ray_max_restarts", None)
        self.max_restarts = DEFAULT_MAX_RESTARTS if restarts is None else int(restarts)
        self.placed: list[Placed] = []
        self.etcd: Any = None
        self.url: str | None = None

    # -- discovery ---------------------------------------------------------------------

    def discovery_url(self) -> str:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        url = self.args.discovery
        if url:
            if url.startswith("embedded:"):
                raise ServeFailed(
                    "--discovery embedded:// cannot cross nodes; give --discovery "
                    "etcd://HOST:PORT, or leave it out to run etcd on the Ray head")
            return url
        head = next((n for n in ray.nodes()
                     if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})),
                    None)
        if head is None:
            raise ServeFailed("cannot find the Ray head node to run etcd on; give --discovery "
                              "etcd://HOST:PORT")
        on_head = NodeAffinitySchedulingStrategy(node_id=head["NodeID"], soft=False)
        from splitserve.runtime.ray.actors import EtcdActor, find_etcd

        found = ray.get(ray.remote(num_cpus=0)(find_etcd).options(
            scheduling_strategy=on_head).remote(), timeout=120)
        if not found:
            raise ServeFailed(
                f"no --discovery given and no `etcd` binary on the Ray head node "
                f"({head.get('NodeManagerAddress')}): install etcd there (Debian/Ubuntu: "
                "apt-get install etcd-server) or pass --discovery etcd://HOST:PORT")
        self.etcd = ray.remote(EtcdActor).options(
            num_cpus=0, max_restarts=0, scheduling_strategy=on_head,
            name="etcd").remote()
        url = ray.get(self.etcd.url.remote(), timeout=120)
        logger.info("started etcd on the Ray head: %s", url)
        return url

    # -- start -------------------------------------------------------------------------

    def start(self) -> str:
        """Place every process, wait until the frontend counts every worker; the /v1 URL."""
        import ray

        from splitserve.runtime.ray.actors import ProcessActor

        total = ray.cluster_resources()
        url = self.discovery_url()
        specs = plan_processes(self.args, url, total)
        for note in placement_warnings(specs, total):
            logger.warning("%s", note)
        actor_cls = ray.remote(ProcessActor)
        for spec in specs:
            actor = actor_cls.options(
                name=spec.name, max_restarts=self.max_restarts, max_task_retries=0,
                max_concurrency=4, **spec.resources.options(),
            ).remote(spec.name, list(spec.args), dict(spec.env))
            self.placed.append(Placed(spec, actor))
            logger.info("%s: asks for %s", spec.name, spec.resources.describe())
        self._wait_ready(self.args.ready_timeout)
        frontend = self.placed[0]
        self.url = self._frontend_url(frontend.info or {})
        self._wait_healthy(self.args.ready_timeout)
        return self.url

    def _frontend_url(self, info: dict[str, Any]) -> str:
        host = str(info.get("host", "127.0.0.1"))
        if host in ("", "0.0.0.0", "::"):
            host = str(info.get("node_ip"))
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{info.get('port')}"

    def _wait_ready(self, timeout: float) -> None:
        import ray

        _, _, _, ray_error = _ray_errors()
        pending = {p.actor.ready.remote(timeout): p for p in self.placed}
        started = time.monotonic()
        hinted = False
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                placed = pending.pop(ref)
                try:
                    placed.info = ray.get(ref)
                except ray_error as exc:  # the actor died, or ChildFailed inside ready()
                    raise ServeFailed(f"{placed.spec.name} failed to start: {_why(exc)}") from None
                placed.pid = placed.info.get("pid")
                logger.info("%s is ready on node %s (%s)", placed.spec.name,
                            placed.info.get("node_ip"), str(placed.info.get("node_id"))[:12])
            if self.stop.is_set():
                raise ServeFailed("stopped during startup")
            now = time.monotonic()
            if not hinted and now - started > 60 and pending:
                hinted = True
                logger.warning("still waiting for %s (a process not placed yet waits for a node "
                               "with the resources it asks for: %s)",
                               ", ".join(p.spec.name for p in pending.values()),
                               "; ".join(f"{p.spec.name}: {p.spec.resources.describe()}"
                                         for p in pending.values()))
            if now - started > timeout:
                raise ServeFailed("not ready after %.0fs: %s" % (
                    timeout, ", ".join(p.spec.name for p in pending.values())))

    def _wait_healthy(self, timeout: float) -> None:
        import ray

        frontend = self.placed[0]
        want = {"decode": sum(p.spec.role == "decode" for p in self.placed),
                "prefill": sum(p.spec.role == "prefill" for p in self.placed)}
        deadline = time.monotonic() + timeout
        while True:
            status, body = ray.get(frontend.actor.http_get.remote("/health"), timeout=30)
            counts = body.get("workers", {}) if isinstance(body, dict) else {}
            if all(counts.get(role, 0) >= n for role, n in want.items()):
                return
            if self.stop.is_set():
                raise ServeFailed("stopped during startup")
            if time.monotonic() > deadline:
                raise ServeFailed(f"the frontend counts {counts or status}, not {want}, "
                                  f"after {timeout:.0f}s")
            time.sleep(0.2)

    # -- watch -------------------------------------------------------------------------

    def watch(self, interval: float = 1.0) -> int:
        """Until a signal (0) or a process dead for good that we cannot serve without (1)."""
        import ray

        died, unavailable, actor_error, _ = _ray_errors()
        while not self.stop.wait(interval):
            alive = [p for p in self.placed if not p.dead]
            refs = {p.actor.ping.remote(): p for p in alive}
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=10)
            for ref in done:
                placed = refs[ref]
                try:
                    info = ray.get(ref)
                except died as exc:
                    placed.dead = True
                    logger.error("%s is dead (restarts used up): %s", placed.spec.name, _why(exc))
                    continue
                except (actor_error, *((unavailable,) if unavailable else ())):
                    logger.warning("%s is restarting", placed.spec.name)
                    continue
                if placed.pid is not None and info.get("pid") != placed.pid:
                    logger.warning("%s was restarted by Ray (pid %s -> %s)", placed.spec.name,
                                   placed.pid, info.get("pid"))
                placed.pid = info.get("pid")
            dead = [p for p in self.placed if p.dead]
            if not dead:
                continue
            decode_left = [p for p in self.placed if p.spec.role == "decode" and not p.dead]
            fatal = [p for p in dead if p.spec.role != "prefill" or not decode_left]
            if fatal:
                logger.error("%s cannot be served without; stopping everything",
                             ", ".join(p.spec.name for p in fatal))
                return 1
            for p in dead:
                if p.spec.role == "prefill":
                    logger.error("serving on without %s (decode workers prefill locally)",
                                 p.spec.name)
                    self.placed.remove(p)
        return 0

    # -- teardown ----------------------------------------------------------------------

    def teardown(self, timeout: float = 20.0) -> None:
        """Stop the frontend, then the workers (they drain), then etcd; kill every actor."""
        import ray

        _, _, _, ray_error = _ray_errors()

        def stop_all(actors: list[Any], wait_s: float) -> None:
            refs = []
            for actor in actors:
                try:
                    refs.append(actor.stop.remote(wait_s))
                except ray_error:
                    pass
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=wait_s + 10)

        frontends = [p.actor for p in self.placed if p.spec.role == "frontend"]
        workers = [p.actor for p in self.placed if p.spec.role != "frontend"]
        stop_all(frontends, 10.0)
        stop_all(workers, timeout)
        if self.etcd is not None:
            stop_all([self.etcd], 10.0)
        for actor in [*frontends, *workers, *([self.etcd] if self.etcd is not None else [])]:
            try:
                ray.kill(actor, no_restart=True)
            except ray_error:
                pass
            except ValueError:  # not an actor handle any more
                pass
        self.placed.clear()
        self.etcd = None


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def run_on_ray(args: argparse.Namespace) -> int:
    """`splitserve serve --ray [ADDRESS]`: exit 0 on Ctrl-C/SIGTERM, 1 on failure, 2 on usage."""
    try:
        import ray
    except ImportError:
        print("splitserve serve --ray needs Ray: pip install 'splitserve[ray]' "
              "(or pip install 'ray[default]')", file=sys.stderr)
        return 2
    problem = check_serve_args(args)  # serve checked them already; other callers may not
    if problem is not None:
        print(f"splitserve serve: {problem}", file=sys.stderr)
        return 2
    if str(getattr(args, "discovery", None) or "").startswith("embedded:"):
        print("splitserve serve: --discovery embedded:// cannot cross nodes; give --discovery "
              "etcd://HOST:PORT, or leave it out to run etcd on the Ray head", file=sys.stderr)
        return 2
    address = args.ray or None
    namespace = f"splitserve-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=True,
                 logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...
        print(f"splitserve serve: cannot connect to Ray at {address or '(auto)'}: {exc}",
              file=sys.stderr)
        return 1

    with stop_on_signals() as (stop, signals):
        return _serve_on_ray(args, ray, stop, signals)


def _serve_on_ray(args: argparse.Namespace, ray: Any, stop: threading.Event, signals: list[int]) -> int:
    deployment = RayDeployment(args, stop)
    try:
        url = deployment.start()
        n = args.decode_workers
        m = getattr(args, "prefill_workers", 0)
        where = ", ".join(f"{p.spec.name}@{(p.info or {}).get('node_ip')}"
                          for p in deployment.placed)
        print(serving_banner(args.model, url, n, m, f" on Ray: {where}"), flush=True)
        code = deployment.watch()
        if code == 0:
            logger.info("stopping (signal %s)", signals[0] if signals else "?")
        return code
    except ServeFailed as exc:
        if stop.is_set():
            return 0
        logger.error("%s", exc)
        return 1
    except ray.exceptions.RayError as exc:  # e.g. etcd could not start, a get timed out
        if stop.is_set():
            return 0
        logger.error("Ray: %s", _why(exc))
        return 1
    finally:
        try:
            deployment.teardown()
        finally:
            ray.shutdown()
