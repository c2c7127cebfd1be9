"""`splitserve bench router --json FILE [--quick] [--micro-only]`: the router's figures.

Micro (always): route latency of 4k-token prompts against an index of 1M blocks over 64
simulated workers (`route_p99_ms`, target <= 0.5; the latency is `Router.select` end to end:
hashing the prompt, the index walk, the cost model over every worker), and the KV event
ingest rate, msgpack decoding included (`ingest_blocks_per_s`, target >= 200k).

Live (bench/router_live.py): 2 aggregated workers (`splitserve serve`, one thread each), 8
system prompts of 1,024 tokens × short user turns, Poisson arrivals; TTFT p50/p90 and
prefix-hit rate for kv, round-robin and random on fresh servers with the same workload
(`ttft_p50_ms.kv`, `ttft_p50_ms.round_robin`, `ttft_p50_ms.random`, `ttft_p90_ms.*`,
`prefix_hit_rate.*`; target round-robin p50 / kv p50 >= 2). `--quick` runs 40 requests per
mode instead of 96 (a few minutes in all).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

ROUTE_P99_TARGET_MS = 0.5
INGEST_TARGET_BLOCKS_PER_S = 200_000
#: Live: round-robin TTFT p50 over kv TTFT p50.
TTFT_RATIO_TARGET = 2.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="router micro benchmark (+ live kv vs round-robin)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the report here")
    p.add_argument("--quick", action="store_true", help="fewer queries (a few seconds)")
    p.add_argument("--micro-only", action="store_true", help="skip the live part")
    p.add_argument("--workers", type=int, default=64, help="simulated workers (default 64)")
    p.add_argument("--blocks", type=int, default=1_000_000,
                   help="distinct blocks to index (default 1M)")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="tokens per routed prompt")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--queries", type=int, default=None,
                   help="routed prompts to time (default 5000, --quick 1000)")
    p.add_argument("--seed", type=int, default=0)
    live = p.add_argument_group("live")
    live.add_argument("--live-only", action="store_true", help="skip the micro part")
    live.add_argument("--live-requests", type=int, default=None,
                      help="requests per mode (default 96, --quick 40)")
    live.add_argument("--live-rate", type=float, default=None,
                      help="Poisson arrivals per second (default 0.4)")
    live.add_argument("--live-modes", default="kv,round-robin,random",
                      help="comma-separated routing modes (default kv,round-robin,random)")
    live.add_argument("--live-prefixes", type=int, default=8, help="system prompts (default 8)")
    live.add_argument("--live-prefix-tokens", type=int, default=1024,
                      help="tokens per system prompt (default 1024)")
    live.add_argument("--live-kv-cache-memory", default=None,
                      help="KV cache per worker (default 104MiB: ~half the system prompts)")
    live.add_argument("--live-model", default="smollm2-135m", help="model to serve")
    p.set_defaults(func=run)


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def run_micro(
    *,
    num_workers: int = 64,
    num_blocks: int = 1_000_000,
    prompt_tokens: int = 4096,
    block_size: int = 16,
    num_queries: int = 5000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the index through encoded events (timing the ingest), then time routing."""
    import os
    import random
    import time

    from tqdm import tqdm

    from splitserve.engine.kv_hash import hash_token_blocks
    from splitserve.router.config import RouterConfig
    from splitserve.router.events import KvEventBatch, BlockStored, encode_batch
    from splitserve.router.router import Router

    rng = random.Random(seed)
    blocks_per_prompt = prompt_tokens // block_size
    # Shared prompts (real token ids, real hashes): each worker holds random-length prefixes
    # of some of them, so routed prompts match deep on several workers (the slow case).
    num_prompts = 256
    prompts = [[rng.randrange(1, 128_000) for _ in range(prompt_tokens)] for _ in range(num_prompts)]
    prompt_hashes = [hash_token_blocks(p, block_size) for p in prompts]
    per_worker_prompts = 24
    held_prompts: list[list[tuple[int, int]]] = []  # per worker: (prompt, prefix blocks)
    for _ in range(num_workers):
        picks = rng.sample(range(num_prompts), min(per_worker_prompts, num_prompts))
        held_prompts.append([(p, rng.randint(blocks_per_prompt // 4, blocks_per_prompt))
                             for p in picks])
    shared_distinct = len({h for w in held_prompts for p, n in w for h in prompt_hashes[p][:n]})
    filler_per_worker = max(0, -(-(num_blocks - shared_distinct) // num_workers))

    # Encoded batches as a KvEventPublisher would emit them: events of up to 16 blocks
    # (one engine step's worth), 64 events per batch.
    worker_ids = [f"worker-{i}" for i in range(num_workers)]
    encoded: list[bytes] = []
    total_event_blocks = 0
    ev_blocks, ev_per_batch = 16, 64
    for wi, wid in enumerate(worker_ids):
        chains: list[list[int]] = [prompt_hashes[p][:n] for p, n in held_prompts[wi]]
        left = filler_per_worker
        while left > 0:
            n = min(left, blocks_per_prompt)
            chains.append([rng.getrandbits(64) for _ in range(n)])
            left -= n
        events = []
        for chain in chains:
            for s in range(0, len(chain), ev_blocks):
                part = tuple(chain[s : s + ev_blocks])
                parent = chain[s - 1] if s else None
                events.append(BlockStored(part, parent, len(part) * block_size))
                total_event_blocks += len(part)
        event_id = 0
        for s in range(0, len(events), ev_per_batch):
            event_id += 1
            encoded.append(encode_batch(
                KvEventBatch(wid, event_id, block_size, tuple(events[s : s + ev_per_batch]))
            ))

    router = Router(RouterConfig(block_size=block_size, max_active_blocks_frac=1.0, seed=seed))
    for wid in worker_ids:
        router.add_worker(wid, "decode", block_size=block_size, total_blocks=1 << 20)

    t0 = time.perf_counter()
    for data in tqdm(encoded, desc="ingest", unit="batch", disable=not progress, leave=False):
        router.apply_events(data)
    ingest_s = time.perf_counter() - t0

    # Queries: a held prompt (matching deep on the workers holding it) with a fresh tail half
    # of the time, so both full and partial matches are timed.
    queries = []
    for _ in range(num_queries):
        p = prompts[rng.randrange(num_prompts)]
        if rng.random() < 0.5:
            cut = rng.randrange(block_size, prompt_tokens)
            p = p[:cut] + [rng.randrange(1, 128_000) for _ in range(prompt_tokens - cut)]
        queries.append(p)

    for q in queries[:50]:  # warm-up
        router.select(q)
    pc = time.perf_counter_ns
    cpu = time.thread_time_ns
    route_ms: list[float] = []
    route_cpu_ms: list[float] = []
    hash_ms: list[float] = []
    match_ms: list[float] = []
    overlaps = 0
    for q in tqdm(queries, desc="route", unit="req", disable=not progress, leave=False):
        c = cpu()
        t = pc()
        sel = router.select(q)
        route_ms.append((pc() - t) / 1e6)
        route_cpu_ms.append((cpu() - c) / 1e6)
        overlaps += sel.overlap_blocks
    for q in queries[: max(1, num_queries // 5)]:
        t = pc()
        hashes = router.hash_tokens(q)
        t1 = pc()
        router.index.find_matches_for_hashes(hashes)
        t2 = pc()
        hash_ms.append((t1 - t) / 1e6)
        match_ms.append((t2 - t1) / 1e6)
    route_ms.sort()
    route_cpu_ms.sort()
    hash_ms.sort()
    match_ms.sort()
    return {
        "workers": num_workers,
        "indexed_blocks": router.index.num_blocks,
        "indexed_entries": sum(router.index.num_worker_blocks(w) for w in worker_ids),
        "prompt_tokens": prompt_tokens,
        "block_size": block_size,
        "queries": num_queries,
        "route_p50_ms": _percentile(route_ms, 50),
        "route_p99_ms": _percentile(route_ms, 99),
        "route_max_ms": route_ms[-1],
        # CPU time of the same calls: the wall-clock tail on a shared machine is mostly
        # preemption by other processes (see load_average).
        "route_cpu_p50_ms": _percentile(route_cpu_ms, 50),
        "route_cpu_p99_ms": _percentile(route_cpu_ms, 99),
        "hash_p50_ms": _percentile(hash_ms, 50),
        "find_matches_p50_ms": _percentile(match_ms, 50),
        "find_matches_p99_ms": _percentile(match_ms, 99),
        "mean_overlap_blocks": overlaps / max(1, num_queries),
        "ingest_blocks": total_event_blocks,
        "ingest_batches": len(encoded),
        "ingest_s": ingest_s,
        "ingest_blocks_per_s": total_event_blocks / ingest_s if ingest_s > 0 else float("inf"),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    """The live comparison (kv vs round-robin vs random) on real workers."""
    from splitserve.bench.router_live import LiveConfig
    from splitserve.bench.router_live import run_live as _run_live

    kw: dict[str, Any] = {}
    if args.live_rate is not None:
        kw["rate"] = args.live_rate
    if args.live_kv_cache_memory is not None:
        kw["kv_cache_memory"] = args.live_kv_cache_memory
    cfg = LiveConfig(
        modes=tuple(m.strip() for m in args.live_modes.split(",") if m.strip()),
        num_prefixes=args.live_prefixes,
        prefix_tokens=args.live_prefix_tokens,
        num_requests=args.live_requests or (40 if args.quick else 96),
        model=args.live_model,
        seed=args.seed,
        **kw,
    )
    return _run_live(cfg, progress=sys.stderr.isatty())


def run(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    if args.micro_only and args.live_only:
        print("splitserve bench router: --micro-only and --live-only exclude each other",
              file=sys.stderr)
        return 2
    report: dict[str, Any] = {"bench": "router", "quick": quick, "targets": {}}
    if not args.live_only:
        queries = args.queries if args.queries is not None else (1000 if quick else 5000)
        micro = run_micro(
            num_workers=args.workers,
            num_blocks=args.blocks,
            prompt_tokens=args.prompt_tokens,
            block_size=args.block_size,
            num_queries=queries,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
        report["route_p99_ms"] = micro["route_p99_ms"]
        report["ingest_blocks_per_s"] = micro["ingest_blocks_per_s"]
        report["targets"].update({
            "route_p99_ms": {"max": ROUTE_P99_TARGET_MS,
                             "met": micro["route_p99_ms"] <= ROUTE_P99_TARGET_MS},
            "ingest_blocks_per_s": {"min": INGEST_TARGET_BLOCKS_PER_S,
                                    "met": micro["ingest_blocks_per_s"] >= INGEST_TARGET_BLOCKS_PER_S},
        })
        report["micro"] = micro
    if args.micro_only:
        report["live"] = {"skipped": "--micro-only"}
    else:
        try:
            live = run_live(args)
        except ValueError as exc:
            print(f"splitserve bench router: {exc}", file=sys.stderr)
            return 2
        for key in ("ttft_p50_ms", "ttft_p90_ms", "prefix_hit_rate", "ttft_p50_ratio_vs_kv"):
            if key in live:
                report[key] = live[key]
        ratio = live.get("ttft_p50_ratio_vs_kv", {}).get("round_robin")
        if ratio is not None:
            report["targets"]["ttft_p50_round_robin_over_kv"] = {
                "min": TTFT_RATIO_TARGET, "value": ratio, "met": ratio >= TTFT_RATIO_TARGET}
        report["live"] = live
    text = json.dumps(report, indent=2, sort_keys=False)
    print(text)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
