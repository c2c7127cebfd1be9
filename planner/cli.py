"""`splitserve plan`: recommended prefill and decode pool sizes for SLO targets and a load.

    splitserve plan --ttft-ms 500 --itl-ms 50 --isl 3000 --osl 200 --rps 20 \
        [--gpu-budget N] [--profile FILE] [--json FILE]

Prints a JSON object with `prefill_replicas`, `decode_replicas`, `total_gpus`, the expected
goodput (`goodput_rps`, `goodput_per_gpu_rps`: requests/s served within both targets,
total and per GPU) and the per-replica figures behind them (see `planner/sla_math.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from splitserve.planner.cli_common import (
    add_pool_limit_args,
    add_profile_arg,
    add_slo_args,
    nonneg_float,
    positive_float,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="recommend prefill/decode pool sizes for TTFT/ITL targets",
        description=__doc__.splitlines()[0],
    )
    add_slo_args(p, required=True)
    p.add_argument("--isl", type=positive_float, required=True, help="mean prompt length (tokens)")
    p.add_argument("--osl", type=positive_float, required=True, help="mean output length (tokens)")
    p.add_argument("--rps", type=nonneg_float, required=True, help="request rate (requests/s)")
    add_profile_arg(p)
    add_pool_limit_args(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result to FILE")
    p.set_defaults(func=run)


def make_plan(
    profile: Any,
    *,
    ttft_ms: float,
    itl_ms: float,
    isl: float,
    osl: float,
    rps: float,
    gpu_budget: int | None = None,
    min_prefill: int = 1,
    min_decode: int = 1,
    max_prefill: int | None = None,
    max_decode: int | None = None,
    prefill_gpus: int = 1,
    decode_gpus: int = 1,
    max_prefill_utilization: float = 0.9,
) -> dict[str, Any]:
    """The `plan` result as a dict (pure; the CLI prints it)."""
    from splitserve.planner.sla_math import fit_budget, goodput_rps, mdc_wait_ms, size_pools

    plan = size_pools(
        profile,
        rps=rps,
        isl=isl,
        osl=osl,
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
        max_prefill_utilization=max_prefill_utilization,
    )
    p, d = plan.prefill_replicas, plan.decode_replicas
    if rps > 0:
        p, d = max(p, min_prefill, 1), max(d, min_decode, 1)
    if max_prefill is not None:
        p = min(p, max_prefill)
    if max_decode is not None:
        d = min(d, max_decode)
    wanted = (p, d)
    p, d = fit_budget(
        p,
        d,
        gpu_budget,
        prefill_gpus=prefill_gpus,
        decode_gpus=decode_gpus,
        min_prefill=min(1, p),
        min_decode=min(1, d),
    )
    gpus = p * prefill_gpus + d * decode_gpus
    good = goodput_rps(profile, plan, p, d)
    util = rps * plan.prefill.isl / (p * plan.prefill.raw_tok_s) if p else 0.0
    ttft = plan.prefill.idle_ttft_ms + mdc_wait_ms(plan.prefill.service_ms, p, util) if p else math.inf
    result: dict[str, Any] = {
        "prefill_replicas": p,
        "decode_replicas": d,
        "total_gpus": gpus,
        "goodput_rps": good,
        "goodput_per_gpu_rps": good / gpus if gpus else 0.0,
        "feasible": plan.feasible,
        "budget_limited": (p, d) != wanted,
        "inputs": {"ttft_ms": ttft_ms, "itl_ms": itl_ms, "isl": isl, "osl": osl, "rps": rps, "gpu_budget": gpu_budget},
        "prefill": {
            "per_replica_tok_s_meeting_ttft": plan.prefill.tok_s,
            "per_replica_rps_meeting_ttft": plan.prefill.rps,
            "raw_tok_s": plan.prefill.raw_tok_s,
            "max_utilization_meeting_ttft": plan.prefill.utilization,
            "idle_ttft_ms": plan.prefill.idle_ttft_ms,
            "expected_mean_ttft_ms": ttft if math.isfinite(ttft) else None,
            "utilization": util,
            "demand_tok_s": plan.prefill_demand_tok_s,
        },
        "decode": {
            "context_tokens": plan.decode.context,
            "batch_meeting_itl": plan.decode.batch,
            "itl_ms_at_that_batch": plan.decode.itl_ms,
            "per_replica_tok_s": plan.decode.tok_s,
            "per_replica_rps": plan.decode.tok_s / osl,
            "demand_tok_s": plan.decode_demand_tok_s,
        },
    }
    if (p, d) != wanted:
        result["unconstrained"] = {"prefill_replicas": wanted[0], "decode_replicas": wanted[1]}
    notes = []
    if not plan.prefill.feasible:
        notes.append(
            f"TTFT target {ttft_ms} ms is below the idle prefill TTFT at ISL {isl:g} "
            f"({plan.prefill.idle_ttft_ms:.0f} ms): no pool size meets it"
        )
    if not plan.decode.feasible:
        notes.append(f"ITL target {itl_ms} ms is not met even at batch 1 at context {plan.decode.context:g}")
    if (p, d) != wanted:
        notes.append(f"GPU budget {gpu_budget} < {wanted[0] * prefill_gpus + wanted[1] * decode_gpus} wanted: pools scaled down")
    result["notes"] = notes
    return result


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.profile import ProfileError, load_profile, resolve_profile_path

    try:
        path = resolve_profile_path(args.profile)
        profile = load_profile(path)
    except ProfileError as exc:
        print(f"splitserve plan: {exc}", file=sys.stderr)
        return 2
    for name in ("gpu_budget", "max_prefill", "max_decode"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"splitserve plan: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not 0 < args.max_prefill_utilization < 1:
        print("splitserve plan: --max-prefill-utilization must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        result = make_plan(
            profile,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            isl=args.isl,
            osl=args.osl,
            rps=args.rps,
            gpu_budget=args.gpu_budget,
            min_prefill=args.min_prefill,
            min_decode=args.min_decode,
            max_prefill=args.max_prefill,
            max_decode=args.max_decode,
            prefill_gpus=args.prefill_gpus_per_replica,
            decode_gpus=args.decode_gpus_per_replica,
            max_prefill_utilization=args.max_prefill_utilization,
        )
    except ValueError as exc:
        print(f"splitserve plan: {exc}", file=sys.stderr)
        return 2
    result["profile"] = {"path": str(path), **{k: profile.metadata.get(k) for k in ("model", "dtype", "machine")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
