"""`splitserve generate`: run one prompt through the engine and print the completion."""

from __future__ import annotations

import argparse

from .config import (ATTENTION_BACKENDS, DEFAULT_MODEL, KV_CACHE_DTYPES, QUANTIZATIONS,
                     EngineConfig)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by every command that builds an engine (vLLM's names)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF model directory, .gguf file, or the alias smollm2-135m (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size on CPU, e.g. 1GiB (default 1GiB)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the KV cache's element type: auto (the model's) | bfloat16 (a float32 "
                        "model on CPU: half the KV bytes to hold, move and read each decode step; "
                        "keys and values rounded to bfloat16) | fp8 = fp8_e4m3 (a float32 or "
                        "bfloat16 model on CPU: a quarter / half of the bytes; float8 e4m3, no "
                        "scale, saturated at +-448)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests running at once (default 64; a prefill worker on CPU: 1, "
                        "i.e. one prompt per step, first come first served)")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--max-prefill-tokens-per-step", type=int, default=None, metavar="N",
                   help="most prompt tokens one step runs, all chunks together (default: the "
                        "budget); bounds how long a request arriving mid-prefill waits")
    p.add_argument("--max-prefill-tokens-with-decodes", type=int, default=None, metavar="N",
                   help="most prompt tokens a step that also runs decodes may carry (default: "
                        "the whole budget); 0: prompts wait for a step without decodes, for at most "
                        "--max-prefill-hold-s (serve gives its decode workers 0 when there are "
                        "prefill workers)")
    p.add_argument("--max-prefill-hold-s", type=float, default=None, metavar="S",
                   help="a prompt that arrived S seconds ago is no longer held back by "
                        f"--max-prefill-tokens-with-decodes (default {EngineConfig.max_prefill_hold_s:g})")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="auto: keep a GGUF file's Q4_1 weights 4-bit on CPU too (a 4-bit "
                        "kernel for decode); none: dequantize every weight to --dtype; w4a8 "
                        "(CPU): every Q4_1 GEMM against inputs rounded to int8 per "
                        "group of 32, as llama.cpp does: faster, not exact")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads for this engine")


def engine_config_from_args(args: argparse.Namespace, **over):
    from .config import EngineConfig, parse_memory_size

    fields = dict(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory=parse_memory_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs if args.max_num_seqs is not None else EngineConfig.max_num_seqs,
        enable_chunked_prefill=not args.no_chunked_prefill,
        max_prefill_tokens_per_step=args.max_prefill_tokens_per_step,
        max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes,
        max_prefill_hold_s=(args.max_prefill_hold_s if args.max_prefill_hold_s is not None
                            else EngineConfig.max_prefill_hold_s),
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend, num_threads=args.num_threads,
        quantization=args.quantization,
    )
    fields.update(over)
    return EngineConfig(**fields)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from .engine import Engine
    from .errors import EngineInputError, ModelSpecError
    from .model_loader import load_tokenizer, resolve_model
    from .sampling_params import SamplingParams

    try:
        source = resolve_model(args.model)
        config = engine_config_from_args(args)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                seed=args.seed)
    except (ModelSpecError, EngineInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tok = load_tokenizer(source)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True, tokenize=False)
        ids = tok.encode(ids, add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    engine = Engine(config)
    try:
        engine.add_request("cli", ids, params)
    except EngineInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
            text = tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s, "
          f"{engine.runner.dtype}, {engine.runner.device}]", file=sys.stderr)
    return 0
