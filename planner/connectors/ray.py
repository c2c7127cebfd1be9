"""`ray` connector: starts and drains `splitserve worker` processes as Ray actors on a cluster.

For a deployment of `splitserve serve --ray --discovery etcd://HOST:PORT` (or any deployment
whose workers register with a discovery every node reaches). Workers are counted in that
discovery, so those `serve --ray` placed count too; to scale up, the connector creates one
`ProcessActor` (runtime/ray/actors.py: supervises one `splitserve` child on the node Ray
picks) per worker, asking for the same resources `serve --ray` asks for
(runtime/ray/placement.py: the role's `splitserve_<role>` resource when the cluster has it,
a GPU when the engine runs on CUDA, else `--num-threads` CPUs). The worker binds and
advertises its node's IP. To scale down it calls the actor's `stop()` (SIGTERM: the worker
deregisters, drains and exits; SIGKILL after the drain timeout), then kills the actor.
Lifecycle, counting and ordering are shared with the `local` connector (`workers.py`).

The actors belong to the planner's Ray driver: if the planner dies, Ray ends them and their
workers die with them; `close()` drains them first. Workers it did not start (those of
`serve --ray`) are never stopped: their driver would count them as lost.

Connecting: an already initialised Ray (`ray.init` done by the caller) is used as is;
otherwise `ray.init(address)` (None: "auto", the cluster of RAY_ADDRESS or of this machine)
and `ray.shutdown()` on close. Ray is optional: `pip install 'splitserve[ray]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from splitserve.planner.connectors.base import ConnectorError
from splitserve.planner.connectors.workers import WorkerPoolConfig, WorkerPoolConnector, flag_value

log = logging.getLogger(__name__)

#: Seconds between liveness pings of a ready worker's actor.
PING_INTERVAL_S = 2.0


@dataclass(frozen=True)
class RayConnectorConfig(WorkerPoolConfig):
    """How the ray connector reaches the cluster and places workers (fields of
    `WorkerPoolConfig`, plus the ones below). `discovery_url` must cross nodes (`etcd://`)
    unless the cluster is a single machine."""

    #: Ray cluster address for `ray.init` (None: "auto"); unused when Ray is initialised.
    address: str | None = None
    #: Ray namespace to join (None: an anonymous one).
    namespace: str | None = None
    #: Address a worker binds and advertises; `{node_ip}`: the IP of the node it lands on.
    host: str = "{node_ip}"
    #: Restarts Ray grants a worker's actor when its process dies on its own.
    max_restarts: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not self.host:
            raise ValueError("host must be non-empty")


class _RayWorker:
    """A worker's `ProcessActor` as a `WorkerHandle`: every check is a `ray.wait(timeout=0)`."""

    def __init__(self, ray: Any, actor: Any, ready_timeout_s: float, stop_timeout_s: float) -> None:
        self._ray = ray
        self._actor = actor
        self._stop_timeout_s = stop_timeout_s
        self._ready_ref = actor.ready.remote(ready_timeout_s)
        self._ready = False
        self._code: int | None = None
        self._stop_ref: Any = None
        self._ping_ref: Any = None
        self._next_ping = 0.0
        self.pid: int | None = None
        self.node_ip: str | None = None

    def _done(self, ref: Any) -> bool:
        done, _ = self._ray.wait([ref], num_returns=1, timeout=0)
        return bool(done)

    def _end(self, code: int) -> int:
        self._code = code
        with contextlib.suppress(Exception):
            self._ray.kill(self._actor, no_restart=True)
        return code

    def take_ready(self) -> bool:
        if self._ready or self._code is not None or self._stop_ref is not None:
            return self._ready
        if self._done(self._ready_ref):
            try:
                info = self._ray.get(self._ready_ref)
            except Exception as exc:  # noqa: BLE001 - RayTaskError / RayActorError: it failed
                log.warning("ray: worker failed to start: %s", str(exc).strip().splitlines()[-1:])
                self._end(1)
                return False
            self._ready = True
            self.pid = info.get("pid")
            self.node_ip = info.get("node_ip")
        return self._ready

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        if self._stop_ref is not None:
            if not self._done(self._stop_ref):
                return None
            try:
                code = self._ray.get(self._stop_ref)
            except Exception:  # noqa: BLE001 - the actor died while stopping
                code = None
            return self._end(-9 if code is None else int(code))
        if not self._ready:
            if self._done(self._ready_ref):
                self.take_ready()
            return self._code
        now = time.monotonic()
        if self._ping_ref is None and now >= self._next_ping:
            self._ping_ref = self._actor.ping.remote()
        if self._ping_ref is not None and self._done(self._ping_ref):
            ref, self._ping_ref = self._ping_ref, None
            self._next_ping = now + PING_INTERVAL_S
            try:
                info = self._ray.get(ref)
            except Exception:  # noqa: BLE001 - actor dead for good
                return self._end(1)
            if info.get("exit_code") is not None:
                return self._end(int(info["exit_code"]))
            self.pid = info.get("pid", self.pid)
        return None

    def terminate(self) -> None:
        if self._code is None and self._stop_ref is None:
            self._stop_ref = self._actor.stop.remote(self._stop_timeout_s)

    def kill(self) -> None:
        if self._code is None:
            self._end(-9)


class RayConnector(WorkerPoolConnector):
    """Resizes the worker pools of a deployment on a Ray cluster with `ProcessActor`s.

    `RayConnector(RayConnectorConfig(...))`, or the config's fields as keywords (what
    `create_connector("ray", discovery_url=..., ...)` passes).
    """

    kind = "ray"

    def __init__(self, config: RayConnectorConfig | None = None, *, ray_module: Any = None,
                 actor_class: Any = None, **fields: Any) -> None:
        if config is None:
            config = RayConnectorConfig(**fields)
        elif fields:
            raise TypeError("pass either a RayConnectorConfig or its fields, not both")
        self.config: RayConnectorConfig = config
        self._ray = ray_module if ray_module is not None else _import_ray()
        self._owns_ray = False
        if not self._ray.is_initialized():
            try:
                self._ray.init(address=config.address or "auto", namespace=config.namespace,
                               logging_level=logging.WARNING)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...
                raise ConnectorError(f"ray connector: cannot connect to Ray at {config.address or 'auto'}: {exc}") \
                    from exc
            self._owns_ray = True
        if actor_class is None:
            from splitserve.runtime.ray.actors import ProcessActor as actor_class
        self._actor_cls = self._ray.remote(actor_class)
        try:
            super().__init__(config)
        except BaseException:
            self._shutdown_ray()
            raise

    def _launch(self, role: str, worker_id: str) -> _RayWorker:
        from splitserve.runtime.ray.placement import actor_resources

        cfg = self.config
        device = flag_value(list(cfg.worker_args), "--device")
        res = actor_resources(role, argparse.Namespace(device=device, num_threads=cfg.threads_per_worker),
                              self._ray.cluster_resources())
        args = cfg.worker_argv(role, worker_id, cfg.host, advertise_host=cfg.host)
        actor = self._actor_cls.options(
            max_restarts=cfg.max_restarts, max_task_retries=0, max_concurrency=4, **res.options()
        ).remote(worker_id, args, cfg.worker_env())
        log.info("ray: %s asks for %s", worker_id, res.describe())
        return _RayWorker(self._ray, actor, cfg.ready_timeout_s, cfg.stop_timeout_s)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self._owns_ray:
            self._owns_ray = False
            with contextlib.suppress(Exception):
                self._ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConnectorError("the ray connector needs Ray: pip install 'splitserve[ray]'") from exc
    return ray
