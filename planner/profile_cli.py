"""`splitserve profile`: measure prefill and decode performance of one replica.

Runs the engine in-process with the worker's settings (threads, dtype, block size):
- prefill: time to first token of one prompt per input length on an idle engine, no
  prefix reuse;
- decode: step time (inter-token latency) for a grid of concurrency × context. Decode
  cost does not depend on what the KV cache holds, so the grid's contexts are admitted as
  already-prefilled requests (the disaggregated path) instead of being prefilled first.
Writes the profile JSON the planner reads (format: planner/profile.py) and, with --plot,
PNG plots. With --colocation it also measures how much a prefill and a decode replica slow
each other on one host (planner/colocation.py) and records it in `metadata.colocation`.
"""

from __future__ import annotations

import argparse

DEFAULT_ISL = [128, 256, 512, 1024, 2048]
DEFAULT_BATCH = [1, 2, 4, 8, 16, 32]
DEFAULT_CONTEXT = [256, 512, 1024, 2048]


def register(subparsers) -> None:
    from splitserve.engine.cli import add_engine_args

    p = subparsers.add_parser("profile", help="measure prefill/decode performance for the planner")
    p.add_argument("--json", dest="json_path", required=True, help="write the profile here")
    p.add_argument("--plot", default=None, help="directory for PNG plots (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="a coarse grid (about a minute)")
    p.add_argument("--isl", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--context", type=int, nargs="+", default=None)
    p.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per cell")
    p.add_argument("--passes", type=int, default=2,
                   help="sweeps over the prompt lengths and the decode grid; each figure is "
                        "the best of its passes (default 2)")
    p.add_argument("--colocation", action="store_true",
                   help="also measure the slowdown of a prefill and a decode replica sharing this host")
    add_engine_args(p)
    p.set_defaults(func=run, num_threads=1, dtype="auto")


def _random_prompt(rng, n: int, vocab: int) -> list[int]:
    return [rng.randrange(300, vocab) for _ in range(n)]


def _prefill_params():
    """Sampling of a prompt-only request: one greedy token."""
    from splitserve.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def warm_up(engine, rng) -> None:
    """One short prompt through the engine (kernels loaded, first-call costs paid)."""
    engine.generate([_random_prompt(rng, 64, engine.model_config.vocab_size)], _prefill_params())
    engine.pool.reset_prefix_cache()


def prefill_ms(engine, isl: int, rng) -> float:
    """TTFT (ms) of an `isl`-token prompt, no prefix reuse: the best of 2 fresh prompts."""
    import time

    params = _prefill_params()
    best = float("inf")
    for _ in range(2):
        prompt = _random_prompt(rng, isl, engine.model_config.vocab_size)
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        best = min(best, time.perf_counter() - t0)
        engine.pool.reset_prefix_cache()
    return best * 1e3


def best_over_passes(passes: int, cells: list, measure, progress, desc: str) -> dict:
    """{cell: the lowest of measure(cell) over `passes` separate sweeps of every cell}. A
    shared host has slow spells seconds long (a neighbour's load): one lands on a few
    consecutive cells of a sweep, rarely on the same cell of two sweeps a minute apart, so the
    lower figure is the engine's and not the spell's (it moved single cells of this
    machine's profile by 1.5-2x)."""
    best: dict = {}
    for _ in range(passes):
        for cell in progress(cells, desc=desc, unit="cell"):
            value = measure(cell)
            if value is not None:
                best[cell] = value if cell not in best else min(best[cell], value)
    return best


def measure_decode_cell(engine, batch: int, ctx: int, steps: int, rng) -> float:
    """Median step time (ms) with `batch` requests decoding at context ~ctx."""
    import statistics
    import time

    from splitserve.engine.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    ids = []
    for i in range(batch):
        rid = f"prof-{batch}-{ctx}-{i}"
        plan = engine.add_remote_request(rid, _random_prompt(rng, ctx, vocab), params, 300)
        if plan is None:
            raise RuntimeError("KV cache too small for this cell")
        engine.remote_ready(rid, True)
        ids.append(rid)
    engine.step()  # admits every request (one token each)
    engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    # The median step: one step slowed by a transient neighbour on a shared host does not
    # move the cell (the mean did: a 2x outlier in one cell of the shipped profile).
    dt = statistics.median(times)
    for rid in ids:
        engine.abort(rid)
    engine.pool.reset_prefix_cache()
    return dt * 1e3


def run(args: argparse.Namespace) -> int:
    import datetime
    import os
    import random
    import sys

    from tqdm import tqdm

    from splitserve.bench.common import machine_info
    from splitserve.engine.cli import engine_config_from_args
    from splitserve.engine.engine import Engine
    from splitserve.planner.profile import PROFILE_FORMAT_VERSION, Profile, save_profile

    if args.passes < 1:
        raise SystemExit("splitserve profile: --passes must be at least 1")
    isls = args.isl or ([128, 512, 1024] if args.quick else DEFAULT_ISL)
    batches = args.batch or ([1, 4, 16] if args.quick else DEFAULT_BATCH)
    contexts = args.context or ([256, 1024] if args.quick else DEFAULT_CONTEXT)
    config = engine_config_from_args(
        args, max_num_seqs=max(batches) + 1,
        max_num_batched_tokens=max(args.max_num_batched_tokens, max(isls), max(batches) + 1),
    )
    engine = Engine(config)
    rng = random.Random(0)
    capacity = engine.pool.num_blocks * config.block_size
    warm_up(engine, rng)
    prefill = best_over_passes(args.passes, isls, lambda isl: prefill_ms(engine, isl, rng),
                               tqdm, "prefill")
    ttft = [prefill[isl] for isl in isls]
    ptok = [isl / (ms / 1e3) for isl, ms in zip(isls, ttft)]

    def decode_cell(cell):
        b, c = cell
        if b * (c + args.decode_steps + 4) > capacity:
            return None  # beyond KV capacity: left null, as the format says
        return measure_decode_cell(engine, b, c, args.decode_steps, rng)

    decode = best_over_passes(args.passes, [(b, c) for b in batches for c in contexts],
                              decode_cell, tqdm, "decode")
    itl = [[decode.get((b, c)) for c in contexts] for b in batches]
    dtok = [[None if ms is None else b / (ms / 1e3) for ms in row] for b, row in zip(batches, itl)]
    colocation = None
    if args.colocation:
        from splitserve.planner.colocation import measure_colocation

        print("measuring co-location slowdown (a neighbour process per role)")
        colocation = measure_colocation(engine, args, rng)
    info = machine_info()
    data = {
        "version": PROFILE_FORMAT_VERSION,
        "metadata": {
            "model": args.model, "dtype": str(engine.runner.dtype).replace("torch.", ""),
            "threads": config.num_threads or info.get("torch_threads"),
            "block_size": config.block_size, "machine": info.get("cpu", info["platform"]),
            "passes": args.passes,
            "device": engine.runner.device.type, "kv_capacity_tokens": capacity,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": "splitserve " + " ".join(sys.argv[1:]),
            # Other load on the machine while measuring (1/5/15-minute load averages).
            "load_average": list(os.getloadavg()),
            **({"colocation": colocation} if colocation else {}),
        },
        "prefill": {"isl": isls, "ttft_ms": ttft, "tok_s": ptok},
        "decode": {"batch": batches, "context": contexts, "itl_ms": itl, "tok_s": dtok},
    }
    profile = Profile.from_dict(data)  # validates
    save_profile(profile, args.json_path)
    if args.plot:
        _plot(profile, data, args.plot)
    print(f"profile written to {args.json_path}")
    return 0


def _plot(profile, data: dict, out_dir: str) -> None:
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped")
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(data["prefill"]["isl"], data["prefill"]["ttft_ms"], "o-")
    ax[0].set(xlabel="input tokens", ylabel="TTFT (ms)", title="prefill")
    for j, c in enumerate(data["decode"]["context"]):
        xs = [b for i, b in enumerate(data["decode"]["batch"]) if data["decode"]["itl_ms"][i][j] is not None]
        ys = [v[j] for v in data["decode"]["itl_ms"] if v[j] is not None]
        ax[1].plot(xs, ys, "o-", label=f"context {c}")
    ax[1].set(xlabel="concurrent requests", ylabel="ITL (ms)", title="decode")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "profile.png")
