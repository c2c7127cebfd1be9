"""Worker CPU pinning: `splitserve worker --cpus LIST` and `splitserve serve --pin-workers`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from splitserve.runtime.serve_cli import build_plan, register, worker_cores
from splitserve.runtime.worker_cli import parse_cpu_list


def test_parse_cpu_list():
    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list(" 2 , 1 ") == {1, 2}
    for bad in ("a", "3-1", "-1", "1-", ""):
        with pytest.raises(ValueError, match="--cpus"):
            parse_cpu_list(bad)


def _child_affinity(text: str) -> subprocess.CompletedProcess:
    code = ("import os; from splitserve.runtime.worker_cli import pin_cpus; "
            f"pin_cpus({text!r}); print(sorted(os.sched_getaffinity(0)))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_pin_cpus_restricts_the_process():
    first = min(os.sched_getaffinity(0))
    out = _child_affinity(str(first))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{first}]"


def test_pin_cpus_refuses_cores_it_cannot_use():
    out = _child_affinity(str(max(os.sched_getaffinity(0)) + 1000))
    assert out.returncode != 0 and "not available" in out.stderr


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="info")  # a global flag of runtime/cli.py
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_pins_each_worker_to_its_own_cores():
    cores = sorted(os.sched_getaffinity(0))
    args = _serve_args("--pin-workers", "--decode-workers", "1", "--prefill-workers", "1",
                       "--num-threads-per-worker", "1")
    workers, _ = build_plan(args, "embedded://x")
    pinned = {name: argv[argv.index("--cpus") + 1] for name, argv in workers}
    assert pinned == {"decode-0": str(cores[0]), "prefill-0": str(cores[1 % len(cores)])}


def test_serve_without_pinning_passes_no_cpus():
    workers, _ = build_plan(_serve_args("--decode-workers", "2"), "embedded://x")
    assert all("--cpus" not in argv for _, argv in workers)


def test_worker_cores_wrap_around_in_runs_of_the_thread_count():
    cores = sorted(os.sched_getaffinity(0))
    gen = worker_cores(argparse.Namespace(pin_workers=True, num_threads=2))
    runs = [next(gen)[1] for _ in range(len(cores))]
    flat = ",".join(runs).split(",")
    assert flat == [str(c) for c in (cores * 2)[: 2 * len(cores)]]


def test_serve_refuses_pinning_on_ray(capsys):
    from splitserve.runtime.serve_cli import run

    assert run(_serve_args("--ray", "--pin-workers")) == 2
    assert "--pin-workers does not apply with --ray" in capsys.readouterr().err
