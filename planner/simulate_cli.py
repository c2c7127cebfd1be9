"""`splitserve simulate`: the planner against static provisioning on a trace, in simulation.

    splitserve simulate --trace steady|diurnal|bursty|FILE.jsonl --json FILE \
        [--plot FILE.png] [--profile FILE] [--ttft-ms 500 --itl-ms 50] [--rps 20 ...]

Runs the planner in the loop, then static pools sized by `plan` for the trace's peak
(`static_peak`) and mean (`static_mean`) rate, and reports SLO attainment, GPU-hours and
`gpu_hours_saving` = 1 − planner ÷ static_peak GPU-hours. See `planner/simulator/` for the
model and what it approximates.

Scale: 1M+ requests on ~1,000 simulated GPUs run in well under a minute, e.g.
    .venv/bin/python tests/planner/factories.py /tmp/p.json   # a synthetic profile
    splitserve simulate --trace bursty --rps 170 --duration 2h --profile /tmp/p.json ...
(the closing note of issue 7 gives measured figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from splitserve.planner.cli_common import (
    add_planner_args,
    add_pool_limit_args,
    add_profile_arg,
    nonneg_float,
    parse_duration,
    planner_config_kwargs,
    positive_float,
)

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate the planner vs. static pools on a trace",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--trace", required=True, help="steady | diurnal | bursty | a JSONL file (arrival_s|timestamp, isl, osl)"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the report to FILE")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot rate, pools and latencies (needs matplotlib)")
    add_profile_arg(p)
    p.add_argument("--ttft-ms", type=positive_float, default=500.0, help="TTFT target (ms, default 500)")
    p.add_argument("--itl-ms", type=positive_float, default=50.0, help="ITL target (ms, default 50)")
    g = p.add_argument_group("synthetic trace")
    g.add_argument("--rps", type=positive_float, default=20.0, help="mean request rate (default 20)")
    g.add_argument("--isl", type=positive_float, default=3000.0, help="mean prompt length (default 3000)")
    g.add_argument("--osl", type=positive_float, default=200.0, help="mean output length (default 200)")
    g.add_argument("--duration", type=parse_duration, default=7200.0, help="trace length (default 2h)")
    g.add_argument("--period", type=parse_duration, default=3600.0, help="diurnal cycle length (default 1h)")
    g.add_argument("--amplitude", type=float, default=0.6, help="diurnal swing around the mean, 0..1 (default 0.6)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s = p.add_argument_group("simulation")
    s.add_argument("--interval", type=parse_duration, default=30.0, help="planner tick (default 30s)")
    s.add_argument("--startup", type=parse_duration, default=30.0, help="replica start-up delay (default 30s)")
    s.add_argument("--decode-dt", type=parse_duration, default=0.5, help="decode time step (default 0.5s)")
    s.add_argument("--kv-transfer-ms", type=nonneg_float, default=0.0, help="prefill->decode hand-off (default 0)")
    s.add_argument("--no-static", action="store_true", help="skip the static baselines")
    pl = p.add_argument_group("planner")
    add_pool_limit_args(pl)
    add_planner_args(pl)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.config import PlannerConfig, PlannerConfigError
    from splitserve.planner.profile import ProfileError, load_profile
    from splitserve.planner.simulator.report import compare, plot
    from splitserve.planner.simulator.run import SimConfig
    from splitserve.planner.simulator.traces import TRACE_KINDS, TraceSpec, generate_trace, load_trace

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"splitserve simulate: {exc}", file=sys.stderr)
        return 2
    try:
        if args.trace in TRACE_KINDS:
            trace = generate_trace(
                TraceSpec(
                    kind=args.trace,
                    duration_s=args.duration,
                    mean_rps=args.rps,
                    isl=args.isl,
                    osl=args.osl,
                    period_s=args.period,
                    amplitude=args.amplitude,
                    seed=args.seed,
                )
            )
            season = args.season if args.season is not None else (args.period if args.trace != "steady" else None)
        else:
            trace = load_trace(args.trace)
            season = args.season
        pcfg = PlannerConfig(**planner_config_kwargs(args, args.interval, season))
        scfg = SimConfig(
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            interval_s=args.interval,
            startup_s=args.startup,
            decode_dt_s=args.decode_dt,
            kv_transfer_ms=args.kv_transfer_ms,
            prefill_gpus_per_replica=args.prefill_gpus_per_replica,
            decode_gpus_per_replica=args.decode_gpus_per_replica,
        )
    except (OSError, ValueError, PlannerConfigError) as exc:
        print(f"splitserve simulate: {exc}", file=sys.stderr)
        return 2
    log.info("trace %s: %d requests over %.0f s", trace.name, len(trace), trace.duration_s)
    report, runs = compare(trace, profile, pcfg, scfg, include_static=not args.no_static)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(report)
    if args.plot:
        try:
            plot(report, runs, args.plot)
        except ImportError as exc:
            print(f"splitserve simulate: no plot: {exc}", file=sys.stderr)
            return 0
        print(f"plot: {args.plot}")
    return 0


def _print_summary(report: dict) -> None:
    tr = report["trace"]
    print(
        f"trace {tr['name']}: {tr['requests']} requests, {tr['duration_s']:.0f} s, "
        f"mean {tr['mean_rps']:.1f} rps, peak {tr['peak_rps']:.1f} rps; "
        f"SLO ttft {report['slo']['ttft_ms']:g} ms, itl {report['slo']['itl_ms']:g} ms"
    )
    print(f"{'policy':<12} {'attainment':>10} {'ttft_ok':>8} {'itl_ok':>8} {'gpu_hours':>10} {'peak_gpus':>9} {'wall_s':>7}")
    for name in ("planner", "static_peak", "static_mean"):
        r = report.get(name)
        if r is None:
            continue
        print(
            f"{name:<12} {r['slo_attainment']:>10.4f} {r['ttft_attainment']:>8.4f} {r['itl_attainment']:>8.4f} "
            f"{r['gpu_hours']:>10.2f} {r['peak_gpus']:>9d} {r['wall_s']:>7.1f}"
        )
    if "gpu_hours_saving" in report:
        print(f"gpu_hours_saving (vs static_peak): {report['gpu_hours_saving']:.3f}   total wall {report['wall_s']:.1f} s")
