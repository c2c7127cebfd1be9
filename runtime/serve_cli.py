"""`splitserve serve`: the frontend and N decode workers as local processes, one command.

Lifecycle: start the decode workers (each binds a free loopback port and prints a ready
line), wait for all of them, start the frontend pointed at their addresses, wait for it,
print the URL, then watch. Ctrl-C or SIGTERM stops every child (frontend first) and exits 0;
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
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for each process to be ready (default 900)")
    p.set_defaults(func=run)


def build_plan(args: argparse.Namespace) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(worker name, worker argv) for each decode worker, and the frontend's argv minus --worker."""
    from splitserve.runtime.engine_args import engine_argv
    from splitserve.runtime.process import splitserve_argv

    log = ["--log-level", str(args.log_level)]
    workers = []
    for i in range(args.decode_workers):
        name = f"decode-{i}"
        workers.append((name, splitserve_argv(
            *log, "worker", "--role", "decode", "--host", "127.0.0.1", "--port", "0",
            "--worker-id", name, *engine_argv(args))))
    frontend = splitserve_argv(*log, "frontend", "--host", args.host, "--port", str(args.port),
                               "--stats-interval", str(args.stats_interval))
    if args.model:
        frontend += ["--model", args.model]
    if args.max_model_len:
        frontend += ["--max-model-len", str(args.max_model_len)]
    for name in args.served_model_name or ():
        frontend += ["--served-model-name", name]
    if args.api_key:
        frontend += ["--api-key", args.api_key]
    return workers, frontend


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
    try:
        workers, frontend_argv = build_plan(args)
        for name, argv in workers:
            group.spawn(name, argv, env=worker_env)
        addresses = []
        for child in group.children:
            event = child.wait_ready(args.ready_timeout, cancelled=stop)
            addresses.append(f"127.0.0.1:{event['port']}")
            log.info("%s ready on %s", child.name, addresses[-1])
        for address in addresses:
            frontend_argv += ["--worker", f"decode={address}"]
        frontend = group.spawn("frontend", frontend_argv, env=frontend_env)
        event = frontend.wait_ready(args.ready_timeout, cancelled=stop)
        url = event.get("url") or f"http://{args.host}:{event['port']}"
        print(f"splitserve: serving {args.model} at {url}/v1 "
              f"({len(addresses)} decode worker{'s' if len(addresses) != 1 else ''}); "
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
        for s, handler in previous.items():
            signal.signal(s, handler)
