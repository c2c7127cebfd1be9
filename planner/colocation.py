"""Co-location slowdown: how much a prefill replica and a decode replica slow each other
when they share one host's cores and memory (`splitserve profile --colocation`).

On a GPU cluster every replica owns its GPU and the slowdowns are 1. On a CPU host — this
project's 2-core machine, where `serve --prefill-workers 1 --decode-workers 1` runs both
workers side by side — a busy prefill worker slows the decode worker's steps and the other
way round. Lifecycle of one measurement: the profiling process times a workload alone, then
starts a child process (`python -m splitserve.planner.colocation --role R`, the same engine
settings, 1 torch thread) that runs the other role's workload in a loop, waits for its
"ready" line, times the same workload again, and stops the child. The ratio of the two
medians is the slowdown. Recorded in the profile's `metadata.colocation`:

    {"prefill_slowdown": 1.3, "decode_slowdown": 1.6, "isl": 768, "batch": 2, "context": 768, ...}

`prefill_slowdown` multiplies prefill time while the co-located decode replica is running
requests; `decode_slowdown` multiplies decode step time while the co-located prefill replica
is busy. The simulator applies them with `SimConfig.colocated`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

#: The workloads timed: a prompt of ISL tokens; a decode batch at CONTEXT tokens.
ISL = 768
BATCH = 2
CONTEXT = 768
DECODE_STEPS = 24
REPEATS = 5


def _engine(args: argparse.Namespace, max_seqs: int = 8):
    from splitserve.engine.cli import engine_config_from_args
    from splitserve.engine.engine import Engine

    return Engine(engine_config_from_args(args, max_num_seqs=max_seqs))


def time_prefill(engine, rng: random.Random, repeats: int = REPEATS, isl: int = ISL) -> float:
    """Median TTFT (ms) of `isl`-token prompts, no prefix reuse."""
    from splitserve.planner.profile_cli import prefill_ms, warm_up

    warm_up(engine, rng)
    return statistics.median(prefill_ms(engine, isl, rng) for _ in range(repeats))


def time_decode(engine, rng: random.Random, repeats: int = REPEATS) -> float:
    """Median step time (ms) of BATCH requests decoding at CONTEXT."""
    from splitserve.planner.profile_cli import measure_decode_cell

    return statistics.median(measure_decode_cell(engine, BATCH, CONTEXT, DECODE_STEPS, rng) for _ in range(repeats))


def _child_argv(role: str, args: argparse.Namespace) -> list[str]:
    """The neighbour's command line: the profiled engine's flags, on 1 torch thread."""
    from splitserve.runtime.engine_args import engine_argv

    one_thread = argparse.Namespace(**{**vars(args), "num_threads": 1})
    return [sys.executable, "-m", "splitserve.planner.colocation", "--role", role, *engine_argv(one_thread)]


class _Neighbour:
    """A child process running `role`'s workload in a loop while the parent times its own."""

    def __init__(self, role: str, args: argparse.Namespace) -> None:
        self.argv = _child_argv(role, args)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_Neighbour":
        from splitserve.runtime.process import death_signal_preexec

        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     preexec_fn=death_signal_preexec(os.getpid()))
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.__exit__()
            raise RuntimeError(f"co-location child did not start: {line!r}")
        time.sleep(0.5)  # let it get into its loop
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure_colocation(engine, args: argparse.Namespace, rng: random.Random) -> dict:
    """Slowdowns of prefill next to a decoding neighbour and of decode next to a prefilling one."""
    prefill_alone = time_prefill(engine, rng)
    with _Neighbour("decode", args):
        prefill_shared = time_prefill(engine, rng)
    decode_alone = time_decode(engine, rng)
    with _Neighbour("prefill", args):
        decode_shared = time_decode(engine, rng)
    return {
        "prefill_slowdown": max(1.0, prefill_shared / prefill_alone),
        "decode_slowdown": max(1.0, decode_shared / decode_alone),
        "isl": ISL, "batch": BATCH, "context": CONTEXT,
        "prefill_ttft_ms": {"alone": prefill_alone, "shared": prefill_shared},
        "decode_itl_ms": {"alone": decode_alone, "shared": decode_shared},
        "load_average": list(os.getloadavg()),
    }


def _loop(role: str, args: argparse.Namespace) -> None:
    """The neighbour: warm up, say ready, then run the role's workload until terminated."""
    engine = _engine(args)
    rng = random.Random(1)
    work = (lambda: time_prefill(engine, rng, repeats=1)) if role == "prefill" else (
        lambda: time_decode(engine, rng, repeats=1))
    work()
    print("ready", flush=True)
    while True:
        work()


def main(argv: list[str] | None = None) -> int:
    from splitserve.engine.cli import add_engine_args

    p = argparse.ArgumentParser(description="co-location neighbour (started by splitserve profile)")
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    add_engine_args(p)
    args = p.parse_args(argv)
    try:
        _loop(args.role, args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
