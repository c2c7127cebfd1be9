"""`splitserve bench offline`: the engine against transformers `generate` on one request set.

Same prompts, same output lengths (ignore_eos), same dtype and threads, in one run:
splitserve's continuous batching vs transformers' static, padded batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time

from splitserve.engine.config import KV_CACHE_DTYPES, QUANTIZATIONS

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("offline", help="engine vs transformers generate, offline batch")
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--quick", action="store_true", help="small run (under a minute)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="both engines' dtype; auto: bfloat16 where the CPU has bf16 units "
                        "(AVX512-BF16, AMX), else float32")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--min-prompt", type=int, default=None)
    p.add_argument("--max-prompt", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="engine weights: auto keeps the GGUF's Q4_1 4-bit on CPU for decode; "
                        "w4a8 runs every Q4_1 GEMM with int8 inputs (as llama.cpp does; "
                        "not exact)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--skip-hf", action="store_true", help="engine figures only")
    p.add_argument("--single-stream-runs", type=int, default=5, metavar="N",
                   help="times the single-stream decode is measured; the figure is their "
                        "median (default 5)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="the engine's KV cache (e.g. 2GiB); default: room for every request "
                        "of the set at once (as transformers' batches get), at least the "
                        "engine's own default")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the engine's KV cache element type (auto: --dtype's; bfloat16 with a "
                        "float32 model halves the bytes a decode step reads; transformers keeps "
                        "its own cache in --dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # Ordinary vocabulary ids (skip the first few hundred: special and byte tokens).
    return [[rng.randrange(300, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def kv_bytes_for(prompts: list[list[int]], out_len: int, cfg, block_size: int, dtype) -> int:
    """KV cache bytes that hold every request of the set at once, prompt and output."""
    from splitserve.engine.model_runner import kv_block_bytes

    blocks = sum(-(-(len(p) + out_len) // block_size) for p in prompts)
    return blocks * kv_block_bytes(cfg, block_size, dtype)


def single_stream_tok_s(engine, prompt, out_len) -> float:
    """Decode tokens a second of one request alone: its steps after the first token."""
    from splitserve.engine.sampling_params import SamplingParams

    engine.add_request("single", prompt,
                       SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    engine.step()
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        steps += len(engine.step())
    elapsed = time.perf_counter() - t0
    engine.pool.reset_prefix_cache()
    return steps / elapsed


def run_engine(engine, prompts, out_len, single_runs: int = 1) -> dict:
    from splitserve.engine.sampling_params import SamplingParams

    # Prefill throughput: prompts only (one new token each), no prefix reuse.
    engine.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill_s = time.perf_counter() - t0
    engine.pool.reset_prefix_cache()

    # Full run: continuous batching of every request.
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    total_s = time.perf_counter() - t0
    engine.pool.reset_prefix_cache()
    n_out = sum(len(o) for o in outs)

    # Single stream: one 512-token prompt alone, measured single_runs times (this shared
    # host's speed for a batch-1 step varies from run to run): the median, and every run.
    runs = [single_stream_tok_s(engine, prompts[0][:512], out_len) for _ in range(single_runs)]
    return {
        "splitserve_output_tok_s": n_out / total_s,
        "splitserve_total_s": total_s,
        "splitserve_prefill_tok_s": sum(len(p) for p in prompts) / prefill_s,
        "single_stream_decode_tok_s": statistics.median(runs),
        "single_stream_decode_tok_s_runs": runs,
        "outputs": outs,
    }


def run_hf(src, prompts, out_len, batch_size, dtype, progress) -> dict:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=dtype
    ).eval()
    n_out = 0
    t0 = time.perf_counter()
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in progress(batches, desc="transformers", unit="batch"):
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as generate expects
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len,
                              min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        n_out += (out.shape[1] - width) * len(batch)
    total_s = time.perf_counter() - t0
    return {"hf_output_tok_s": n_out / total_s, "hf_total_s": total_s}


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm

    from splitserve.bench.common import emit, machine_info
    from splitserve.engine.config import EngineConfig, parse_memory_size
    from splitserve.engine.engine import Engine
    from splitserve.engine.model_runner import (DEFAULT_KV_CACHE_MEMORY, resolve_dtype,
                                                resolve_kv_cache_dtype)
    from splitserve.engine.native import dtype_name
    from splitserve.engine.model_loader import load_model_config, resolve_model

    if args.single_stream_runs < 1:
        raise SystemExit("splitserve bench offline: --single-stream-runs must be at least 1")
    n = args.num_requests or (16 if args.quick else 64)
    lo = args.min_prompt or 64
    hi = args.max_prompt or (256 if args.quick else 1024)
    out_len = args.output_len or (32 if args.quick else 128)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    src = resolve_model(args.model)
    cfg = load_model_config(src)
    prompts = make_prompts(n, lo, hi, cfg.vocab_size, args.seed)
    settings = {
        "model": src.name, "num_requests": n, "prompt_len": [lo, hi],
        "output_len": out_len, "hf_batch_size": args.hf_batch_size, "threads": threads,
        "quick": args.quick, "single_stream_runs": args.single_stream_runs,
    }
    config = EngineConfig(model=args.model, dtype=args.dtype, num_threads=threads,
                          max_num_seqs=max(64, n), max_num_batched_tokens=2048,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if args.kv_cache_memory is not None:
        kv_memory = parse_memory_size(args.kv_cache_memory)
    else:  # with 1 GiB, a float32 cache holds ~23k of the full set's ~41k tokens
        cpu = torch.device("cpu")
        try:
            kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype,
                                              resolve_dtype(args.dtype, cpu), cpu)
        except ValueError as e:
            raise SystemExit(f"splitserve bench offline: {e}") from None
        need = kv_bytes_for(prompts, out_len, cfg, config.block_size, kv_dtype)
        kv_memory = max(need, DEFAULT_KV_CACHE_MEMORY)
    config = dataclasses.replace(config, kv_cache_memory=kv_memory)
    engine = Engine(config)
    dtype = engine.runner.dtype
    settings["dtype"] = str(dtype).replace("torch.", "")
    settings["weights"] = engine.runner.model.weight_format
    settings["block_size"] = engine.config.block_size
    settings["kv_blocks"] = engine.pool.num_blocks
    settings["kv_cache_memory"] = config.kv_cache_memory
    settings["kv_cache_dtype"] = dtype_name(engine.runner.kv_dtype)
    eng = run_engine(engine, prompts, out_len, args.single_stream_runs)
    del eng["outputs"]
    result = {**eng}
    if not args.skip_hf:
        del engine
        hf = run_hf(src, prompts, out_len, args.hf_batch_size, dtype, tqdm)
        result.update(hf)
        result["ratio"] = result["splitserve_output_tok_s"] / hf["hf_output_tok_s"]
    result["settings"] = settings
    result["machine"] = machine_info()
    emit(result, args.json_path)
    return 0
