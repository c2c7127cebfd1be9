"""Engine flags for process launchers: `splitserve serve` parses the engine's own flags
(`splitserve.engine.cli.add_engine_args`) and hands them on to each `splitserve worker`.
"""

from __future__ import annotations

import argparse

#: (flag, args attribute) of the valued engine flags, as engine/cli.py defines them.
_VALUED = (
    ("--model", "model"),
    ("--dtype", "dtype"),
    ("--device", "device"),
    ("--block-size", "block_size"),
    ("--kv-cache-memory", "kv_cache_memory"),
    ("--kv-cache-dtype", "kv_cache_dtype"),
    ("--gpu-memory-utilization", "gpu_memory_utilization"),
    ("--max-model-len", "max_model_len"),
    ("--max-num-batched-tokens", "max_num_batched_tokens"),
    ("--max-num-seqs", "max_num_seqs"),
    ("--max-prefill-tokens-per-step", "max_prefill_tokens_per_step"),
    ("--max-prefill-tokens-with-decodes", "max_prefill_tokens_with_decodes"),
    ("--max-prefill-hold-s", "max_prefill_hold_s"),
    ("--attention-backend", "attention_backend"),
    ("--quantization", "quantization"),
    ("--num-threads", "num_threads"),
)
#: (flag, args attribute) of the boolean engine flags.
_SWITCHES = (
    ("--no-chunked-prefill", "no_chunked_prefill"),
    ("--no-prefix-caching", "no_prefix_caching"),
)


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags set in `args`, as an argv for a child `splitserve worker`."""
    out: list[str] = []
    for flag, attr in _VALUED:
        value = getattr(args, attr, None)
        if value is not None:
            out += [flag, str(value)]
    for flag, attr in _SWITCHES:
        if getattr(args, attr, False):
            out.append(flag)
    return out
