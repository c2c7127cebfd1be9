"""`splitserve frontend`: the OpenAI HTTP API in front of workers given by address.

    splitserve frontend --model smollm2-135m --port 8000 --worker decode=127.0.0.1:50051

When it listens it prints one JSON line on stdout,
`{"event": "ready", "role": "frontend", "host": ..., "port": ..., "url": ...}`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("frontend", help="run the OpenAI-compatible HTTP frontend")
    add_frontend_args(p)
    p.add_argument("--worker", action="append", default=[], metavar="ROLE=HOST:PORT",
                   help="a worker to send requests to (repeatable), e.g. decode=127.0.0.1:50051")
    p.add_argument("--discovery", default=None, metavar="URL",
                   help="also take workers from discovery: embedded://NAME or etcd://HOST:PORT/NS")
    p.add_argument("--router-address", default=None, metavar="HOST:PORT",
                   help="route through a standalone `splitserve router` (shared by several "
                        "frontends) instead of the in-process router; unreachable: 503")
    p.set_defaults(func=run)


def add_frontend_args(p: argparse.ArgumentParser, *, model_flags: bool = True) -> None:
    """Flags shared with `splitserve serve` (which has its own --model/--max-model-len)."""
    if model_flags:
        p.add_argument("--model", default=None,
                       help="model whose tokenizer and config to use (default smollm2-135m)")
        p.add_argument("--max-model-len", type=int, default=None,
                       help="context limit (default: the workers', else the model's)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="name clients use in 'model' (repeatable; default: the model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: no auth)")
    p.add_argument("--stats-interval", type=float, default=1.0,
                   help="seconds between worker Stats polls (default 1)")
    from splitserve.frontend.disagg import DEFAULT_MAX_LOCAL_PREFILL_TOKENS, DisaggConfig

    p.add_argument("--max-local-prefill-tokens", type=int, default=DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
                   help="prompts with more uncached tokens go to a prefill worker when one is "
                        f"free; 0: always when one exists (default {DEFAULT_MAX_LOCAL_PREFILL_TOKENS})")
    p.add_argument("--max-prefill-queue", type=int, default=DisaggConfig.max_prefill_queue,
                   help="a prefill worker with this many prompts queued or running counts as full; "
                        "when all are, a decode worker prefills the prompt in its idle time "
                        f"(default {DisaggConfig.max_prefill_queue}; not applied with "
                        "--max-local-prefill-tokens 0)")
    from splitserve.frontend.routing import add_router_args

    # `serve` sets the router's block size from the engine's.
    add_router_args(p, block_size=model_flags)


def parse_worker_spec(text: str) -> tuple[str, str]:
    """'decode=127.0.0.1:50051' -> ('decode', '127.0.0.1:50051')."""
    role, sep, address = text.partition("=")
    if not sep or not role or ":" not in address:
        raise ValueError(f"--worker wants ROLE=HOST:PORT, got {text!r}")
    return role.strip(), address.strip()


def config_from_args(args: argparse.Namespace):
    from splitserve.engine.config import DEFAULT_MODEL
    from splitserve.frontend.config import FrontendConfig
    from splitserve.frontend.disagg import DisaggConfig
    from splitserve.frontend.routing import router_config_from_args

    return FrontendConfig(
        model=args.model or DEFAULT_MODEL,
        served_model_names=tuple(args.served_model_name or ()),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        stats_interval_s=args.stats_interval,
        discovery_url=getattr(args, "discovery", None),
        router_address=getattr(args, "router_address", None),
        disagg=DisaggConfig(max_local_prefill_tokens=args.max_local_prefill_tokens,
                            max_prefill_queue=args.max_prefill_queue),
        router=router_config_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    try:
        config = config_from_args(args)
        workers = [parse_worker_spec(w) for w in args.worker]
    except ValueError as exc:
        print(f"splitserve frontend: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve_frontend(config, workers, log_level=args.log_level))


async def serve_frontend(config, workers: list[tuple[str, str]], log_level: str = "info") -> int:
    import asyncio
    import json
    import logging
    import socket

    import uvicorn

    from splitserve.frontend.app import create_app
    from splitserve.frontend.worker_pool import WorkerPool, static_worker_id

    log = logging.getLogger("splitserve.frontend")
    pool = WorkerPool(stats_interval_s=config.stats_interval_s)
    for role, address in workers:
        pool.add(static_worker_id(role, address), role, address)
    app = create_app(config, pool)

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
        sock.close()
        return 1
    sock.listen(2048)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=str(log_level).lower(), access_log=False, lifespan="on",
        timeout_graceful_shutdown=5,
    ))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():  # startup failed (logged by uvicorn)
        sock.close()
        return 1
    host = config.host if ":" not in config.host else f"[{config.host}]"
    print(json.dumps({"event": "ready", "role": "frontend", "host": config.host, "port": port,
                      "url": f"http://{host}:{port}"}), flush=True)
    await task
    sock.close()
    return 0
