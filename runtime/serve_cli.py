"""`splitserve serve`: the frontend and N decode workers as local processes, one command.

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


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.frontend.cli import add_frontend_args
    from splitserve.engine.cli import add_engine_args

    p = subparsers.add_parser(
        "serve", help="serve a model: OpenAI API frontend + decode workers on this machine")
    add_engine_args(p)
    p.add_argument("--num-threads-per-worker", dest="num_threads", type=int, default=None,
                   help="torch threads of each worker (same as --num-threads)")
    add_frontend_args(p, model_flags=False)
    p.add_argument("--decode-workers", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--discovery", default=None, metavar="URL",
                   help="discovery the workers register with and the frontend watches "
                        "(default: a private embedded:// deployment)")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for each process to be ready (default 900)")
    p.set_defaults(func=run)


def build_plan(args: argparse.Namespace, discovery_url: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(name, argv) of each decode worker, and the frontend's argv; all meet in discovery."""
    from splitserve.runtime.engine_args import engine_argv
    from splitserve.runtime.process import splitserve_argv

    log = ["--log-level", str(args.log_level)]
    workers = []
    for i in range(args.decode_workers):
        name = f"decode-{i}"
        workers.append((name, splitserve_argv(
            *log, "worker", "--role", "decode", "--host", "127.0.0.1", "--port", "0",
            "--worker-id", name, "--discovery", discovery_url, *engine_argv(args))))
    frontend = splitserve_argv(*log, "frontend", "--host", args.host, "--port", str(args.port),
                               "--stats-interval", str(args.stats_interval), "--model", args.model,
                               "--discovery", discovery_url)
    if args.max_model_len:
        frontend += ["--max-model-len", str(args.max_model_len)]
    for name in args.served_model_name or ():
        frontend += ["--served-model-name", name]
    if args.api_key:
        frontend += ["--api-key", args.api_key]
    return workers, frontend


def private_discovery() -> tuple[str, object]:
    """A fresh embedded:// deployment for this serve, and the directory to remove at exit."""
    import os
    import secrets

    from splitserve.runtime.discovery.embedded import deployment_dir, embedded_url

    name = f"serve-{os.getpid()}-{secrets.token_hex(4)}"
    return embedded_url(name), deployment_dir(name).parent


def wait_healthy(url: str, num_decode: int, timeout: float, stop, group) -> None:
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
                if json.load(resp)["workers"].get("decode", 0) >= num_decode:
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
    import os
    import signal
    import sys
    import threading

    from splitserve.runtime.process import ChildFailed, ProcessGroup

    log = logging.getLogger("splitserve.serve")
    if args.decode_workers < 1:
        print("splitserve serve: --decode-workers must be >= 1", file=sys.stderr)
        return 2

    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
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
        wait_healthy(url, args.decode_workers, args.ready_timeout, stop, group)
        n = args.decode_workers
        print(f"splitserve: serving {args.model} at {url}/v1 "
              f"({n} decode worker{'s' if n != 1 else ''}); "
              "Ctrl-C to stop", flush=True)
        while not stop.wait(0.2):
            dead = group.first_exited()
            if dead is not None:
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
            import shutil

            shutil.rmtree(cleanup_dir, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
