"""The `splitserve` command line.

Each subcommand lives with the component that owns it and exposes
`register(subparsers) -> None`, which adds its parser and sets `func=<callable(args) -> int>`.
Modules are imported only to build the parser; heavy imports (torch, grpc, …) belong inside
the command functions so `splitserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> module that provides register(subparsers)
COMMANDS: dict[str, str] = {
    "generate": "splitserve.engine.cli",
    "serve": "splitserve.runtime.serve_cli",
    "worker": "splitserve.runtime.worker_cli",
    "frontend": "splitserve.frontend.cli",
    "router": "splitserve.router.cli",
    "profile": "splitserve.planner.profile_cli",
    "plan": "splitserve.planner.cli",
    "planner": "splitserve.planner.loop_cli",
    "simulate": "splitserve.planner.simulate_cli",
}

# `splitserve bench <name>` -> module that provides register(subparsers)
BENCHES: dict[str, str] = {
    "offline": "splitserve.bench.offline",
    "serve": "splitserve.bench.serve",
    "router": "splitserve.bench.router",
    "kv-transfer": "splitserve.bench.kv_transfer",
    "disagg": "splitserve.bench.disagg",
    "sim-validate": "splitserve.bench.sim_validate",
}


def _register_all(subparsers: argparse._SubParsersAction, table: dict[str, str]) -> None:
    for name, module_name in table.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A component not built yet (or an optional dependency missing): leave it out of
            # the parser rather than break every other command.
            if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                continue
            raise
        module.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_all(sub, COMMANDS)
    bench = sub.add_parser("bench", help="benchmarks (print and write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    _register_all(bench_sub, BENCHES)
    return parser


def quiet_grpc_fork_handlers() -> None:
    """Turn gRPC's fork support off (unless the environment already says otherwise), before
    grpc is imported. Our processes start children (workers, the kernel compiler) while
    channels are live; with fork support on, grpcio 1.81+ restarts its poller in the forked
    child, which can die with EBADF before it execs (grpc/grpc#43055). Children inherit it."""
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def main(argv: list[str] | None = None) -> int:
    quiet_grpc_fork_handlers()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
