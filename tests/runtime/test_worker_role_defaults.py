"""Engine defaults a worker's role sets: a CPU prefill worker runs one prompt per step
(--max-num-seqs 1) unless the flag was given; other roles and devices keep the engine's."""

from __future__ import annotations

import argparse

from splitserve.engine.cli import engine_config_from_args
from splitserve.engine.config import EngineConfig
from splitserve.runtime.serve_cli import build_plan
from splitserve.runtime.serve_cli import register as register_serve
from splitserve.runtime.worker_cli import register as register_worker
from splitserve.runtime.worker_cli import role_engine_defaults


def parse(cmd: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="info")  # a global flag of runtime/cli.py
    sub = parser.add_subparsers()
    (register_worker if cmd == "worker" else register_serve)(sub)
    return parser.parse_args([cmd, *argv])


def test_cpu_prefill_worker_runs_one_prompt_per_step():
    args = parse("worker", "--role", "prefill", "--device", "cpu")
    cfg = engine_config_from_args(args, **role_engine_defaults(args))
    assert cfg.max_num_seqs == 1


def test_flag_role_and_device_keep_the_engine_default():
    given = parse("worker", "--role", "prefill", "--device", "cpu", "--max-num-seqs", "8")
    assert role_engine_defaults(given) == {}
    assert engine_config_from_args(given).max_num_seqs == 8
    for argv in (("--role", "decode", "--device", "cpu"), ("--role", "prefill", "--device", "cuda")):
        args = parse("worker", *argv)
        assert role_engine_defaults(args) == {}
        assert engine_config_from_args(args).max_num_seqs == EngineConfig.max_num_seqs


def test_serve_leaves_the_choice_to_each_worker():
    """serve hands --max-num-seqs on only when given, so each worker applies its role's default."""
    workers, _ = build_plan(parse("serve", "--prefill-workers", "1"), "embedded://x")
    assert workers and all("--max-num-seqs" not in argv for _, argv in workers)
    workers, _ = build_plan(parse("serve", "--prefill-workers", "1", "--max-num-seqs", "4"), "embedded://x")
    assert all(argv[argv.index("--max-num-seqs") + 1] == "4" for _, argv in workers)


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _worker_config(argv: list[str]) -> EngineConfig:
    """The engine config a `splitserve worker` child parses from its argv in the plan."""
    return engine_config_from_args(parse("worker", *argv[argv.index("--role"):]))


def test_serve_holds_local_prompts_on_disaggregated_decode_workers():
    """With prefill workers, decode workers run their own prompts only between decodes
    (--max-prefill-tokens-with-decodes 0) and in 64-token chunks, unless the flags were
    given; aggregated decode workers, and prefill workers, keep the engine's defaults."""
    flag, chunk = "--max-prefill-tokens-with-decodes", "--max-prefill-tokens-per-step"
    workers = dict(build_plan(parse("serve", "--prefill-workers", "1"), "embedded://x")[0])
    assert (_flag(workers["decode-0"], flag), _flag(workers["decode-0"], chunk)) == ("0", "64")
    assert _flag(workers["prefill-0"], flag) is None and _flag(workers["prefill-0"], chunk) is None
    cfg = _worker_config(workers["decode-0"])
    assert (cfg.max_prefill_tokens_with_decodes, cfg.max_prefill_tokens_per_step) == (0, 64)
    workers = dict(build_plan(parse("serve", "--decode-workers", "2"), "embedded://x")[0])
    assert all(_flag(argv, flag) is None and _flag(argv, chunk) is None for argv in workers.values())
    given = parse("serve", "--prefill-workers", "1", flag, "64", chunk, "512",
                  "--max-prefill-hold-s", "0.5")
    workers = dict(build_plan(given, "embedded://x")[0])
    assert _flag(workers["decode-0"], flag) == "64" and _flag(workers["prefill-0"], flag) == "64"
    assert workers["decode-0"].count(chunk) == 1
    cfg = _worker_config(workers["decode-0"])
    assert (cfg.max_prefill_tokens_with_decodes, cfg.max_prefill_tokens_per_step,
            cfg.max_prefill_hold_s) == (64, 512, 0.5)
