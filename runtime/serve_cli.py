"""`splitserve serve`: the frontend, N decode and M prefill workers as local processes, one command.

Lifecycle: start the decode workers and the frontend at the same time; they meet in
discovery (a private `embedded://` deployment unless --discovery names one): each worker
binds a free loopback port and registers, the frontend adds every worker that registers.
Wait for every ready line and for the frontend's /health to count every worker, print the
URL, then watch. Ctrl-C or SIGTERM stops every child (frontend first) and exits 0;
a child that exits on its own is reported, the others are stopped, and we exit 1. Children
die with us even if we are SIGKILLed (parent-death signal).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.frontend.cli import add_frontend_args
    from splitserve.engine.cli import add_engine_args

    p = subparsers.add_parser(
        "serve", help="serve a model: OpenAI API frontend + decode workers on this machine")
    add_engine_args(p)
    p.add_argument("--num-threads-per-worker", dest="num_threads", type=int, default=None,
                   help="torch threads of each worker (same as --num-threads)")
    add_frontend_args(p, model_flags=False)
    p.add_argument("--pin-workers", action="store_true",
                   help="pin each worker to its own cores (its thread count of them, in turn "
                        "over the cores this process may use), so pools don't share cores")
    p.add_argument("--decode-workers", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--prefill-workers", type=int, default=0,
                   help="prefill workers (default 0: aggregated, decode workers prefill)")
    from splitserve.runtime.worker_cli import add_kv_transfer_args

    add_kv_transfer_args(p)
    p.add_argument("--discovery", default=None, metavar="URL",
                   help="discovery the workers register with and the frontend watches "
                        "(default: a private embedded:// deployment)")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for each process to be ready (default 900)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the processes as Ray actors on the cluster at ADDRESS (no ADDRESS: "
                        "RAY_ADDRESS or this machine's cluster, else a new local one); see "
                        "runtime/ray/")
    p.add_argument("--ray-max-restarts", type=int, default=3, metavar="N",
                   help="with --ray: restarts of each process before it counts as dead (default 3)")
    p.set_defaults(func=run)


#: Engine flags a disaggregated deployment's decode workers get unless given: (flag, args
#: attribute, value). 64 prompt tokens are ~0.1 s of one CPU thread: the longest a request
#: whose KV arrives mid-chunk waits (128-token chunks prefill ~10 % faster, but in `bench
#: disagg` left 0.10-0.23 s gaps at the p90 of requests, 64 left 0.04-0.14 s).
DISAGG_DECODE_DEFAULTS = (
    ("--max-prefill-tokens-with-decodes", "max_prefill_tokens_with_decodes", 0),
    ("--max-prefill-tokens-per-step", "max_prefill_tokens_per_step", 64),
    ("--max-prefill-hold-s", "max_prefill_hold_s", 30.0),
)


def build_plan(args: argparse.Namespace, discovery_url: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(name, argv) of each decode worker, and the frontend's argv; all meet in discovery."""
    from splitserve.runtime.engine_args import engine_argv
    from splitserve.runtime.process import splitserve_argv

    log = ["--log-level", str(args.log_level)]
    kv_argv = ["--kv-transport", args.kv_transport, "--kv-pin-timeout", str(args.kv_pin_timeout),
               "--kv-pull-timeout", str(args.kv_pull_timeout)]
    workers = []
    cores = worker_cores(args)
    decode_argv = engine_argv(args)
    if getattr(args, "prefill_workers", 0):
        # Disaggregated: the prompts a decode worker prefills itself (short ones, a full
        # prefill queue, fallbacks) wait for a step without decodes and run in small chunks,
        # so they neither stall its running requests nor keep one that arrives waiting long.
        for flag, attr, value in DISAGG_DECODE_DEFAULTS:
            if getattr(args, attr, None) is None:
                decode_argv += [flag, str(value)]
    for i in range(args.decode_workers):
        name = f"decode-{i}"
        workers.append((name, splitserve_argv(
            *log, "worker", "--role", "decode", "--host", "127.0.0.1", "--port", "0",
            "--worker-id", name, "--discovery", discovery_url, *kv_argv, *decode_argv,
            *next(cores))))
    for i in range(getattr(args, "prefill_workers", 0)):
        name = f"prefill-{i}"
        workers.append((name, splitserve_argv(
            *log, "worker", "--role", "prefill", "--host", "127.0.0.1", "--port", "0",
            "--worker-id", name, "--discovery", discovery_url, *kv_argv, *engine_argv(args),
            *next(cores))))
    frontend = splitserve_argv(*log, "frontend", "--host", args.host, "--port", str(args.port),
                               "--stats-interval", str(args.stats_interval), "--model", args.model,
                               "--discovery", discovery_url,
                               "--max-local-prefill-tokens", str(args.max_local_prefill_tokens),
                               "--max-prefill-queue", str(args.max_prefill_queue))
    if args.max_model_len:
        frontend += ["--max-model-len", str(args.max_model_len)]
    from splitserve.engine.config import EngineConfig
    from splitserve.frontend.routing import router_argv

    frontend += router_argv(args, getattr(args, "block_size", None) or EngineConfig.block_size)
    for name in args.served_model_name or ():
        frontend += ["--served-model-name", name]
    if args.api_key:
        frontend += ["--api-key", args.api_key]
    return workers, frontend


def worker_cores(args: argparse.Namespace):
    """Yields each worker's `--cpus` argv: with --pin-workers, consecutive runs of its thread
    count (default 1) over the cores this process may use, wrapping around; else nothing."""
    import itertools
    import os

    if not getattr(args, "pin_workers", False):
        return itertools.repeat([])
    per = getattr(args, "num_threads", None) or 1
    ring = itertools.cycle(sorted(os.sched_getaffinity(0)))
    return (["--cpus", ",".join(str(next(ring)) for _ in range(per))] for _ in itertools.count())


def private_discovery() -> tuple[str, object]:
    """A fresh embedded:// deployment for this serve, and the directory to remove at exit."""
    import os
    import secrets

    from splitserve.runtime.discovery.embedded import deployment_dir, embedded_url

    name = f"serve-{os.getpid()}-{secrets.token_hex(4)}"
    return embedded_url(name), deployment_dir(name).parent


def _remove_dir(path, attempts: int = 20) -> None:
    """Remove the private discovery directory; retried, since a child's last heartbeat
    write can race with the removal ("directory not empty")."""
    import shutil
    import time
    from pathlib import Path

    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not Path(path).exists():
            return
        time.sleep(0.1)


def wait_healthy(url: str, num_decode: int, timeout: float, stop, group,
                 num_prefill: int = 0) -> None:
    """Poll the frontend's /health until every worker counts; ChildFailed if a child dies."""
    import json
    import time
    import urllib.error
    import urllib.request

    from splitserve.runtime.process import ChildFailed

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url + "/health", timeout=2) as resp:
                counts = json.load(resp)["workers"]
                if counts.get("decode", 0) >= num_decode and counts.get("prefill", 0) >= num_prefill:
                    return
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            pass
        dead = group.first_exited()
        if dead is not None:
            raise ChildFailed(dead.name, dead.poll(),
                              f"{dead.name} exited with code {dead.poll()} during startup")
        if stop.is_set():
            raise ChildFailed("serve", None, "stopped during startup")
        if time.monotonic() > deadline:
            raise ChildFailed("frontend", None, f"workers not healthy after {timeout:.0f}s")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from splitserve.runtime.process import check_serve_args, stop_on_signals

    log = logging.getLogger("splitserve.serve")
    problem = check_serve_args(args)
    if problem is not None:
        print(f"splitserve serve: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "ray", None) is not None:
        from splitserve.runtime.ray.launcher import run_on_ray

        if getattr(args, "pin_workers", False):
            # the cores this driver may use say nothing of the nodes Ray places workers on
            print("splitserve serve: --pin-workers does not apply with --ray", file=sys.stderr)
            return 2

        return run_on_ray(args)
    with stop_on_signals() as (stop, signals):
        return _serve_local(args, stop, signals, log)


def _serve_local(args: argparse.Namespace, stop: Any, signals: list[int], log: Any) -> int:
    """Workers and frontend as local child processes until a signal or a fatal exit."""
    import os

    from splitserve.runtime.process import ChildFailed, ProcessGroup, serving_banner

    group = ProcessGroup()
    worker_env = dict(os.environ)
    if args.num_threads is not None:
        worker_env["OMP_NUM_THREADS"] = str(args.num_threads)
    frontend_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cleanup_dir = None
    try:
        # Workers and frontend load at the same time and meet in discovery: each worker
        # binds a free port and registers; the frontend adds whoever registers.
        discovery_url = args.discovery
        if discovery_url is None:
            discovery_url, cleanup_dir = private_discovery()
        workers, frontend_argv = build_plan(args, discovery_url)
        for name, argv in workers:
            group.spawn(name, argv, env=worker_env)
        frontend = group.spawn("frontend", frontend_argv, env=frontend_env)
        group.wait_all_ready(args.ready_timeout, cancelled=stop)
        event = frontend.ready_event or {}
        url = event.get("url") or f"http://{args.host}:{event.get('port', args.port)}"
        wait_healthy(url, args.decode_workers, args.ready_timeout, stop, group,
                     num_prefill=args.prefill_workers)
        print(serving_banner(args.model, url, args.decode_workers, args.prefill_workers), flush=True)
        reported: set[str] = set()
        while not stop.wait(0.2):
            dead = group.first_exited(ignore=reported)
            if dead is None:
                continue
            decode_left = [c for c in group.children
                           if c.name.startswith("decode-") and c.poll() is None]
            if dead.name.startswith("prefill-") and decode_left:
                # Degraded, not down: decode workers prefill locally from now on.
                log.error("%s exited unexpectedly with code %s; serving on without it "
                          "(decode workers prefill locally)", dead.name, dead.poll())
                reported.add(dead.name)
                continue
            log.error("%s exited unexpectedly with code %s; stopping everything",
                      dead.name, dead.poll())
            return 1
        log.info("stopping (signal %s)", signals[0] if signals else "?")
        return 0
    except ChildFailed as exc:
        if stop.is_set():
            return 0
        log.error("%s", exc)
        return 1
    finally:
        group.stop_all()
        if cleanup_dir is not None:
            _remove_dir(cleanup_dir)
