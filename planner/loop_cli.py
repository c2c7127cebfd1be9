"""`splitserve planner`: the SLO planner, live.

    splitserve planner --ttft-ms 500 --itl-ms 50 --connector dry-run|kubernetes|local|ray \
        --interval 30s --metrics-url http://FRONTEND/metrics [--profile FILE]
    splitserve planner ... --connector local --discovery embedded://NAME [worker flags]
    splitserve planner ... --connector ray --discovery etcd://HOST:PORT [--ray-address A] [worker flags]

Scrapes the frontends' Prometheus metrics every interval, sizes the pools and applies the
result through the connector, until SIGINT or SIGTERM. The `local` and `ray` connectors
start and stop `splitserve worker` processes (local children, or Ray actors) that register
with `--discovery` (the URL given to `splitserve serve --discovery`), with the worker flags
given here; they stop the workers they started when the planner exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from splitserve.planner.cli_common import (
    add_planner_args,
    add_pool_limit_args,
    add_profile_arg,
    add_slo_args,
    parse_duration,
    planner_config_kwargs,
)

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("planner", help="run the SLO planner loop live", description=__doc__.splitlines()[0])
    add_slo_args(p, required=True)
    p.add_argument("--connector", default="dry-run", help="dry-run | kubernetes | local | ray (default dry-run)")
    p.add_argument("--interval", type=parse_duration, default=30.0, help="tick interval (default 30s)")
    p.add_argument(
        "--metrics-url",
        action="append",
        required=True,
        help="a frontend's Prometheus URL, e.g. http://127.0.0.1:8000/metrics (repeat for several)",
    )
    p.add_argument("--scrape-timeout", type=parse_duration, default=5.0, help="per-scrape timeout (default 5s)")
    add_profile_arg(p)
    add_pool_limit_args(p)
    add_planner_args(p)
    p.add_argument("--max-ticks", type=int, default=None, help="stop after this many decisions (tests)")
    d = p.add_argument_group("dry-run connector")
    d.add_argument("--record", default=None, metavar="FILE.jsonl", help="append each decision to FILE.jsonl")
    d.add_argument("--initial-prefill", type=int, default=1, help="pretended prefill replicas at start (default 1)")
    d.add_argument("--initial-decode", type=int, default=1, help="pretended decode replicas at start (default 1)")
    k = p.add_argument_group("kubernetes connector")
    k.add_argument("--k8s-namespace", default="default", help="namespace of the Deployments (default: default)")
    k.add_argument("--k8s-prefill-deployment", default="splitserve-prefill", help="prefill Deployment name")
    k.add_argument("--k8s-decode-deployment", default="splitserve-decode", help="decode Deployment name")
    _add_local_args(p)
    p.set_defaults(func=run)


def _add_local_args(p: argparse.ArgumentParser) -> None:
    from splitserve.engine.cli import add_engine_args
    from splitserve.runtime.worker_cli import add_kv_transfer_args

    g = p.add_argument_group(
        "local and ray connectors",
        "workers that register with --discovery; the engine and KV transfer flags below are each "
        "new worker's (use the ones given to `splitserve serve`; --num-threads: threads per "
        "worker, default 1)",
    )
    g.add_argument("--discovery", default=None, metavar="URL",
                   help="discovery of the deployment (the --discovery of `splitserve serve`; "
                        "etcd://... for ray)")
    g.add_argument("--max-workers", type=int, default=4,
                   help="most workers of the deployment, both roles, whoever started them (default 4)")
    g.add_argument("--worker-roles", "--local-roles", dest="worker_roles", default="decode", metavar="ROLES",
                   help="roles to resize, comma-separated (default decode; prefill,decode when the "
                        "deployment runs prefill workers)")
    g.add_argument("--stop-external", "--local-stop-external", dest="stop_external", action="store_true",
                   help="local: also stop workers this planner did not start when scaling down (note: "
                        "`splitserve serve` exits when one of its own decode workers exits)")
    g.add_argument("--worker-ready-timeout", type=parse_duration, default=600.0,
                   help="kill a started worker not ready after this long (default 600s)")
    g.add_argument("--worker-drain-timeout", type=parse_duration, default=60.0,
                   help="kill a stopped worker still draining after this long (default 60s)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="ray: the cluster to join (default auto: RAY_ADDRESS or this machine's)")
    g.add_argument("--ray-namespace", default=None, help="ray: namespace to join (default anonymous)")
    g.add_argument("--ray-max-restarts", type=int, default=0, metavar="N",
                   help="ray: restarts of a worker's actor when its process dies (default 0)")
    add_kv_transfer_args(g)
    add_engine_args(g)


def _worker_pool_options(args: argparse.Namespace) -> dict:
    from splitserve.runtime.engine_args import engine_argv

    if not args.discovery:
        raise ValueError(f"--connector {args.connector} needs --discovery URL (the deployment's discovery)")
    to_zero = args.scale_to_zero_after is not None
    return {
        "discovery_url": args.discovery,
        "worker_args": (
            "--kv-transport", args.kv_transport, "--kv-pin-timeout", str(args.kv_pin_timeout),
            "--kv-pull-timeout", str(args.kv_pull_timeout),
            *engine_argv(argparse.Namespace(**{**vars(args), "num_threads": None})),
        ),
        "threads_per_worker": args.num_threads or 1,
        "max_workers": args.max_workers,
        "roles": tuple(r.strip() for r in args.worker_roles.split(",") if r.strip()),
        "min_prefill_workers": 0 if to_zero else args.min_prefill,
        "min_decode_workers": 0 if to_zero else args.min_decode,
        "ready_timeout_s": args.worker_ready_timeout,
        "stop_timeout_s": args.worker_drain_timeout,
        "log_level": str(args.log_level),
    }


def _connector_options(args: argparse.Namespace) -> dict:
    if args.connector == "dry-run":
        return {
            "prefill_replicas": args.initial_prefill,
            "decode_replicas": args.initial_decode,
            "record_path": args.record,
        }
    if args.connector == "kubernetes":
        return {
            "namespace": args.k8s_namespace,
            "prefill_deployment": args.k8s_prefill_deployment,
            "decode_deployment": args.k8s_decode_deployment,
        }
    if args.connector == "local":
        return {**_worker_pool_options(args), "stop_external": args.stop_external}
    if args.connector == "ray":
        return {
            **_worker_pool_options(args),
            "address": args.ray_address,
            "namespace": args.ray_namespace,
            "max_restarts": args.ray_max_restarts,
        }
    return {}


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.config import PlannerConfig
    from splitserve.planner.connectors import ConnectorError, create_connector
    from splitserve.planner.core import Planner
    from splitserve.planner.loop import run_loop
    from splitserve.planner.observe import PrometheusObserver
    from splitserve.planner.profile import ProfileError, load_profile

    try:
        profile = load_profile(args.profile)
        config = PlannerConfig(**planner_config_kwargs(args, args.interval, None))
        connector = create_connector(args.connector, **_connector_options(args))
    except (ProfileError, ConnectorError, ValueError) as exc:
        print(f"splitserve planner: {exc}", file=sys.stderr)
        return 2
    observer = PrometheusObserver(args.metrics_url, timeout_s=args.scrape_timeout)
    stop = threading.Event()
    previous = {}

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after this tick", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread (embedded use): rely on the caller's stop
            pass
    log.info(
        "planner: ttft %.0f ms, itl %.0f ms, every %.1f s, connector %s, metrics %s",
        config.ttft_ms, config.itl_ms, config.interval_s, args.connector, ", ".join(args.metrics_url),
    )
    try:
        n = run_loop(
            Planner(config, profile),
            observer,
            connector,
            interval_s=config.interval_s,
            stop=stop,
            max_ticks=args.max_ticks,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("planner stopped after %d decisions", n)
    return 0
