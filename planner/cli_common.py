"""Helpers the planner's commands share: durations, SLO and profile flags."""

from __future__ import annotations

import argparse
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'30s', '500ms', '2m', '1.5h' or a bare number of seconds -> seconds (> 0)."""
    m = _DURATION.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30s, 500ms, 2m, 1h)")
    value = float(m.group(1)) * _UNIT_S[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0: {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def add_slo_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--ttft-ms and --itl-ms."""
    kw = {"required": True} if required else {"default": None}
    p.add_argument("--ttft-ms", type=positive_float, help="time-to-first-token target (ms)", **kw)
    p.add_argument("--itl-ms", type=positive_float, help="inter-token-latency target (ms)", **kw)


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    """--profile FILE (default: planner/profiles/smollm2-135m-cpu.json)."""
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="profile JSON from `splitserve profile` (default: planner/profiles/smollm2-135m-cpu.json)",
    )


def add_pool_limit_args(p: argparse.ArgumentParser) -> None:
    """Replica limits, GPUs per replica and the GPU budget."""
    p.add_argument("--gpu-budget", type=int, default=None, metavar="N", help="total GPUs both pools may use")
    p.add_argument("--min-prefill", type=int, default=1, help="fewest prefill replicas while serving (default 1)")
    p.add_argument("--max-prefill", type=int, default=None, help="most prefill replicas")
    p.add_argument("--min-decode", type=int, default=1, help="fewest decode replicas while serving (default 1)")
    p.add_argument("--max-decode", type=int, default=None, help="most decode replicas")
    p.add_argument("--prefill-gpus-per-replica", type=int, default=1, help="GPUs per prefill replica (default 1)")
    p.add_argument("--decode-gpus-per-replica", type=int, default=1, help="GPUs per decode replica (default 1)")
    p.add_argument(
        "--max-prefill-utilization",
        type=float,
        default=0.9,
        help="highest prefill utilisation the queueing model may plan for (default 0.9)",
    )


def add_planner_args(p: argparse.ArgumentParser) -> None:
    """Predictor, headroom, hysteresis and scale-to-zero flags (PlannerConfig fields)."""
    p.add_argument(
        "--predictor",
        default="holt-winters",
        choices=("constant", "moving-average", "holt-winters", "kalman"),
        help="load predictor (default holt-winters)",
    )
    p.add_argument("--predictor-window", type=int, default=10, help="moving-average window in ticks (default 10)")
    p.add_argument("--season", type=parse_duration, default=None, help="season length for holt-winters (e.g. 24h)")
    p.add_argument("--headroom", type=float, default=1.0, help="fixed multiplier on the forecast (default 1.0)")
    p.add_argument(
        "--headroom-quantile",
        type=float,
        default=0.99,
        help="adaptive headroom: this quantile of observed/forecast rate; 0 turns it off (default 0.99)",
    )
    p.add_argument("--scale-down-ticks", type=int, default=3, help="scale-down hysteresis in ticks (default 3)")
    p.add_argument(
        "--scale-to-zero-after",
        type=parse_duration,
        default=None,
        help="scale both pools to zero after this long without traffic (default: never)",
    )


def planner_config_kwargs(args: argparse.Namespace, interval_s: float, season_s: float | None) -> dict:
    """PlannerConfig keyword arguments from the flags above."""
    season = season_s if season_s is not None else getattr(args, "season", None)
    return {
        "ttft_ms": args.ttft_ms,
        "itl_ms": args.itl_ms,
        "interval_s": interval_s,
        "predictor": args.predictor,
        "predictor_window": args.predictor_window,
        "season_ticks": int(round(season / interval_s)) if season else 0,
        "headroom": args.headroom,
        "headroom_quantile": args.headroom_quantile if args.headroom_quantile else None,
        "max_headroom": max(2.0, args.headroom),
        "min_prefill_replicas": args.min_prefill,
        "max_prefill_replicas": args.max_prefill,
        "min_decode_replicas": args.min_decode,
        "max_decode_replicas": args.max_decode,
        "gpu_budget": args.gpu_budget,
        "prefill_gpus_per_replica": args.prefill_gpus_per_replica,
        "decode_gpus_per_replica": args.decode_gpus_per_replica,
        "max_prefill_utilization": args.max_prefill_utilization,
        "scale_down_ticks": args.scale_down_ticks,
        "scale_to_zero_after_s": args.scale_to_zero_after,
    }
