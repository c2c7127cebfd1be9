"""`python -m splitserve.runtime.discovery URL {list|watch|register ...}`: inspect or
exercise a discovery backend by hand (and from the live tests).

`register` publishes one record, prints one JSON line `{"registered": ...}`, keeps the
registration alive until SIGTERM/SIGINT, then deregisters and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from . import WorkerRecord, open_discovery


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m splitserve.runtime.discovery", description=__doc__.splitlines()[0])
    p.add_argument("url", help="discovery URL (etcd://HOST:PORT[/ns], embedded://NAME, embedded:///dir)")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="print the live records as JSON lines")
    ls.add_argument("--role", choices=["prefill", "decode"])
    sub.add_parser("watch", help="print membership events as JSON lines until interrupted")
    reg = sub.add_parser("register", help="register one record and keep it alive until SIGTERM")
    reg.add_argument("--id", required=True)
    reg.add_argument("--role", required=True, choices=["prefill", "decode"])
    reg.add_argument("--address", required=True)
    reg.add_argument("--model", default="test-model")
    reg.add_argument("--block-size", type=int, default=16)
    reg.add_argument("--ttl", type=float, default=10.0)
    return p


async def _run(args: argparse.Namespace) -> int:
    disc = await open_discovery(args.url)
    try:
        if args.cmd == "list":
            for record in await disc.list(args.role):
                print(record.to_json(), flush=True)
        elif args.cmd == "watch":
            async for kind, record in disc.watch():
                print(json.dumps({"event": kind, "record": record.to_dict()}), flush=True)
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            record = WorkerRecord(id=args.id, role=args.role, address=args.address,
                                  model=args.model, block_size=args.block_size)
            handle = await disc.register(record, ttl_s=args.ttl)
            print(json.dumps({"registered": record.id, "key": handle.key}), flush=True)
            await stop.wait()
    finally:
        await disc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING), stream=sys.stderr)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
