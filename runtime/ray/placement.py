"""What `serve --ray` runs and where: one `ProcessSpec` per process, and the Ray resources
of its actor.

The processes are exactly those of local `splitserve serve` (its `build_plan`), with two
changes for crossing nodes: a worker binds the IP of the node it lands on and advertises
it (`--host {node_ip} --advertise-host {node_ip}`, filled in by the actor), and argv is
kept without the interpreter so each node runs its own.

Placement by role: an actor asks for one unit of `splitserve_<role>` (`splitserve_prefill`,
`splitserve_decode`, `splitserve_frontend`, as deploy/ray/cluster.yaml gives its node
types), so a node offers as many slots per role as it has units. A role resource no node
has is left out (with a warning), so a plain `ray start --head` cluster works too.
Compute: a worker takes one GPU when the engine runs on CUDA (`--device cuda`, or `auto`
on a cluster with GPUs), else `--num-threads` CPUs (default 1, and as many torch threads);
the frontend asks for no CPU, so it fits next to a worker.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.runtime.ray.actors import NODE_IP

logger = logging.getLogger(__name__)

ROLES = ("frontend", "prefill", "decode")


def role_resource(role: str) -> str:
    """The custom Ray resource that marks nodes for `role` (e.g. `splitserve_decode`)."""
    return f"splitserve_{role}"


@dataclass(frozen=True)
class ActorResources:
    """What one actor asks Ray for."""

    #: Logical CPUs held while it lives.
    num_cpus: float = 0.0
    #: GPUs (Ray sets CUDA_VISIBLE_DEVICES for the actor and its child).
    num_gpus: float = 0.0
    #: Custom resources, e.g. {"splitserve_decode": 1}.
    resources: Mapping[str, float] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)`."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            out["resources"] = dict(self.resources)
        return out

    def describe(self) -> str:
        parts = [f"{self.num_cpus:g} CPU"]
        if self.num_gpus:
            parts.append(f"{self.num_gpus:g} GPU")
        parts += [f"{v:g} {k}" for k, v in self.resources.items()]
        return ", ".join(parts)


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the deployment, as a Ray actor runs it."""

    #: Actor and worker id: "decode-0", "prefill-0", "frontend".
    name: str
    #: "decode", "prefill" or "frontend".
    role: str
    #: `splitserve` argv without the interpreter; may hold `{node_ip}`.
    args: tuple[str, ...]
    #: Extra environment of the child.
    env: Mapping[str, str]
    #: Ray resources of its actor.
    resources: ActorResources


def uses_gpu(device: str | None, cluster_resources: Mapping[str, float]) -> bool:
    """Whether workers take a GPU: `--device cuda`, or `auto` on a cluster that has GPUs."""
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    return float(cluster_resources.get("GPU", 0)) > 0


def actor_resources(role: str, args: argparse.Namespace,
                    cluster_resources: Mapping[str, float]) -> ActorResources:
    """Resources of one actor of `role` on a cluster offering `cluster_resources` in all."""
    custom: dict[str, float] = {}
    name = role_resource(role)
    if float(cluster_resources.get(name, 0)) > 0:
        custom[name] = 1.0
    if role == "frontend":
        return ActorResources(num_cpus=0.0, resources=custom)
    if uses_gpu(getattr(args, "device", None), cluster_resources):
        return ActorResources(num_cpus=1.0, num_gpus=1.0, resources=custom)
    return ActorResources(num_cpus=float(getattr(args, "num_threads", None) or 1), resources=custom)


def placement_warnings(specs: list[ProcessSpec], cluster_resources: Mapping[str, float]) -> list[str]:
    """Human-readable notes on roles placed anywhere or waiting for more nodes."""
    notes = []
    for role in ROLES:
        wanted = [s for s in specs if s.role == role]
        if not wanted:
            continue
        name = role_resource(role)
        have = float(cluster_resources.get(name, 0))
        if have <= 0:
            notes.append(f"no node offers the resource {name!r}: {role} processes go to any node "
                         f"with room (start role nodes with --resources '{{\"{name}\": N}}')")
        elif have < len(wanted):
            notes.append(f"{len(wanted)} {role} processes but {have:g} {name!r} in the cluster: "
                         "the rest wait for more nodes")
    return notes


def _split_program(argv: list[str]) -> list[str]:
    """argv of `splitserve_argv(...)` without the interpreter and module."""
    from splitserve.runtime.process import splitserve_argv

    prefix = splitserve_argv()
    if argv[: len(prefix)] != prefix:
        raise ValueError(f"not a splitserve argv: {argv[:4]}")
    return argv[len(prefix):]


def _flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def worker_args_for_ray(args: list[str]) -> list[str]:
    """A worker's args, bound to and advertising the node's IP instead of loopback."""
    out = list(args)
    sub = out.index("worker")
    if "--host" in out[sub:]:
        i = out.index("--host", sub)
        out[i + 1] = NODE_IP
    else:
        out[sub + 1: sub + 1] = ["--host", NODE_IP]
    if "--advertise-host" in out[sub:]:
        out[out.index("--advertise-host", sub) + 1] = NODE_IP
    else:
        j = out.index("--host", sub) + 2
        out[j:j] = ["--advertise-host", NODE_IP]
    return out


def plan_processes(args: argparse.Namespace, discovery_url: str,
                   cluster_resources: Mapping[str, float]) -> list[ProcessSpec]:
    """The processes of `serve --ray`: frontend first, then the workers (local plan order)."""
    from splitserve.runtime.serve_cli import build_plan

    workers, frontend = build_plan(args, discovery_url)
    threads = getattr(args, "num_threads", None)
    specs = [ProcessSpec(
        name="frontend", role="frontend", args=tuple(_split_program(frontend)),
        env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        resources=actor_resources("frontend", args, cluster_resources))]
    for name, argv in workers:
        rest = _split_program(argv)
        role = _flag_value(rest, "--role") or "decode"
        res = actor_resources(role, args, cluster_resources)
        env = {"OMP_NUM_THREADS": str(threads or max(1, int(res.num_cpus)))}
        specs.append(ProcessSpec(name=name, role=role, args=tuple(worker_args_for_ray(rest)),
                                 env=env, resources=res))
    return specs
