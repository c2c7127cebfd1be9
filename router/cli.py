"""`splitserve router`: the KV router standalone over gRPC, shared by several frontends.

    splitserve router --port 7000 --discovery embedded://NAME
    splitserve frontend --discovery embedded://NAME --router-address 127.0.0.1:7000

It follows its workers itself (`--worker ROLE=HOST:PORT`, `--discovery URL`, and any a
frontend tells it of), subscribing to their KV events. When it listens it prints one JSON
line on stdout, `{"event": "ready", "role": "router", "host", "port", "address"}`;
SIGINT or SIGTERM stops it and it exits 0.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.frontend.routing import add_router_args

    p = subparsers.add_parser(
        "router", help="run the KV router standalone over gRPC (shared by several frontends)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (default)")
    p.add_argument("--worker", action="append", default=[], metavar="ROLE=HOST:PORT",
                   help="a worker to follow (repeatable), e.g. decode=127.0.0.1:50051")
    p.add_argument("--discovery", default=None, metavar="URL",
                   help="also follow the workers of discovery: embedded://NAME or "
                        "etcd://HOST:PORT/NS")
    p.add_argument("--model", default=None,
                   help="with --discovery: follow only workers serving this model "
                        "(default: every worker)")
    p.add_argument("--stats-interval", type=float, default=1.0,
                   help="seconds between worker Stats polls (default 1)")
    add_router_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from splitserve.frontend.cli import parse_worker_spec
    from splitserve.frontend.routing import router_config_from_args

    try:
        config = router_config_from_args(args)
        workers = [parse_worker_spec(w) for w in args.worker]
        if args.stats_interval <= 0:
            raise ValueError("--stats-interval must be > 0")
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    except ValueError as exc:
        print(f"splitserve router: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_main(args, config, workers))


async def _main(args: argparse.Namespace, config, workers: list[tuple[str, str]]) -> int:
    import asyncio
    import json
    import logging
    import signal

    from splitserve.router.grpc_service import RouterService, serve_until

    log = logging.getLogger("splitserve.router")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = RouterService(config, workers, discovery_url=args.discovery, model=args.model,
                            stats_interval_s=args.stats_interval)

    def ready(port: int) -> None:
        host = args.host if ":" not in args.host else f"[{args.host}]"
        print(json.dumps({"event": "ready", "role": "router", "host": args.host, "port": port,
                          "address": f"{host}:{port}"}), flush=True)
        log.info("router (mode %s, block size %d) listening on %s:%d", config.mode,
                 config.block_size, args.host, port)

    try:
        await serve_until(service, stop, args.host, args.port, on_ready=ready)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    log.info("router stopped")
    return 0
