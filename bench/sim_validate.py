"""`splitserve bench sim-validate`: the planner's simulator against a live 1 prefill + 1 decode run.

    splitserve bench sim-validate --json FILE [--quick] [--rates R1 R2 ...] [--profile P.json]

Lifecycle, per rate (one at a time, each on a fresh server): start `splitserve serve
--prefill-workers 1 --decode-workers 1 --max-local-prefill-tokens 0 --pin-workers` (1 torch
thread per worker, each on its own core, bf16; every prompt goes to the prefill worker, its KV blocks are pulled by the
decode worker), wait until /health counts both workers, warm both with short requests,
drive a Poisson workload (ISL uniform in [512, 1024], OSL 64, `ignore_eos`) until every
request has finished, then SIGTERM the server. The exact trace that ran — each request's
arrival as the client sent it, its prompt and output length — is written as JSONL
(`FILE.trace-RATE.jsonl`, the format `splitserve simulate --trace` reads) and replayed
through the simulator with the profile, pools fixed at P = 1, D = 1 (static policy, no
planner), in co-location mode: here both workers share the machine's cores, so each slows the
other by the profile's measured `metadata.colocation` factors (`splitserve profile
--colocation`), and the prefill worker runs one prompt per step (a CPU prefill worker's
default). `without_colocation` gives the pools model alone, for reference.

Stack calibration (default; `--no-calibration` turns it off): the profile times the bare
engine, the live path adds the frontend, two RPCs and the worker process around it. Before
each run, after the warm-up, 3 solo requests (ISL 768, OSL 32, one at a time, not part of
the trace) go through the live stack; the profile's prefill times are scaled by their mean
TTFT ÷ the profile's TTFT at that ISL and its decode steps by their mean TPOT ÷ the batch-1
ITL (`stack_calibration`). The simulator then predicts queueing, batching and co-location
from those service times; `uncalibrated` gives the errors with the bare profile.

Compared per rate, over the same requests: TTFT (first token − send) and ITL as the
simulator defines it, each request's TPOT (e2e − TTFT) ÷ (output tokens − 1); mean, p50
and p90 measured and simulated; `ttft_rel_error` / `itl_rel_error` = (simulated −
measured) ÷ measured of the means; `within_15pct` when both are within ±15 % at every
rate. Rates default to 0.3 and 0.5 (--quick: 0.4, 24 requests) of the profile's prefill capacity
at the mean ISL (1 ÷ prefill time ÷ the co-location slowdown), so the run is moderate on
any machine the profile describes.
The JSON records the load average before and after each rate: this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.kv_transfer.config import TRANSPORT_KINDS

logger = logging.getLogger(__name__)

#: serve flags: 1 prefill + 1 decode worker, every prompt prefilled remotely.
SERVE_FLAGS = ["--prefill-workers", "1", "--decode-workers", "1", "--max-local-prefill-tokens", "0",
               "--pin-workers"]
SERVE_WORKERS = {"prefill": 1, "decode": 1}
#: Relative error of the mean TTFT and ITL the issue asks for.
TOLERANCE = 0.15
ITL_METRIC = "TPOT: per request (e2e - ttft) / (output_tokens - 1), as the simulator's mean ITL"


@dataclass(frozen=True)
class SimValidateConfig:
    """One `bench sim-validate` run."""

    #: Model the server runs (serve's --model); the profile must describe it.
    model: str = "smollm2-135m"
    #: Weights and KV dtype of both workers.
    dtype: str = "auto"
    #: KV transport (auto: NIXL when it starts, else gRPC).
    kv_transport: str = "auto"
    #: Inclusive ranges the input and output lengths are drawn from, uniformly.
    isl_range: tuple[int, int] = (512, 1024)
    osl_range: tuple[int, int] = (64, 64)
    #: Poisson rates (requests/s); None: rate_fractions x the profile's prefill capacity.
    rates: tuple[float, ...] | None = None
    rate_fractions: tuple[float, ...] = (0.3, 0.5)
    #: Measured requests per rate.
    num_requests: int = 40
    #: The profile the simulator uses; None: the shipped default.
    profile: str | None = None
    #: Prefill -> decode KV hand-off the simulator adds (ms; from `bench kv-transfer`).
    kv_transfer_ms: float = 0.0
    #: Simulate the two workers as sharing this host's cores (they do: serve runs both here),
    #: with the profile's measured co-location slowdowns (`splitserve profile --colocation`).
    colocated: bool = True
    #: The prefill worker's step token budget when it packs queued prompts into one step;
    #: None: one prompt per step, as a CPU prefill worker runs (--max-num-seqs 1 default).
    prefill_max_batched_tokens: int | None = None
    #: Simulator decode step (s): small against the ITL so the fluid step is near exact.
    decode_dt_s: float = 0.005
    #: Relative error of the means that counts as a match.
    tolerance: float = TOLERANCE
    #: Before each run, time `calibration_requests` solo requests (ISL `calibration_isl`,
    #: OSL `calibration_osl`, one at a time, not part of the trace) through the live stack and
    #: scale the profile's prefill and decode times by live / profile (`stack_calibrated`);
    #: False: the bare-engine profile as it is.
    calibrate: bool = True
    calibration_requests: int = 3
    calibration_isl: int = 768
    calibration_osl: int = 32
    #: Seeds prompts and arrivals.
    seed: int = 0
    #: --max-prefill-queue of the frontend: high, so no prompt falls back to local prefill.
    max_prefill_queue: int = 1000
    request_timeout_s: float = 900.0
    ready_timeout_s: float = 600.0
    quick: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from splitserve.bench.disagg import DisaggBenchConfig

        # the same workload checks as bench disagg (lengths, rates, request count)
        DisaggBenchConfig(isl_range=self.isl_range, osl_range=self.osl_range, rates=self.rates,
                          num_requests=self.num_requests)
        if not self.rate_fractions or min(self.rate_fractions) <= 0:
            raise ValueError("rate fractions must be > 0")
        if self.kv_transfer_ms < 0 or self.decode_dt_s <= 0 or self.tolerance <= 0:
            raise ValueError("kv_transfer_ms must be >= 0, decode_dt_s and tolerance > 0")


# -- pure logic (unit-tested) ---------------------------------------------------------------
def trace_from_results(results: list, osls: list[int], name: str = "live"):
    """The trace that ran: arrivals as sent (s from the first), prompt lengths, and the
    output lengths asked for (`ignore_eos`: what was generated). Results in request order."""
    from splitserve.planner.simulator.traces import Trace

    if not results or len(results) != len(osls):
        raise ValueError("need one output length per result")
    start = np.asarray([r.start for r in results], dtype=np.float64)
    order = np.argsort(start, kind="stable")
    arrival = start[order] - start.min()
    return Trace(
        name=name,
        arrival_s=arrival,
        isl=np.asarray([r.input_len for r in results], dtype=np.int64)[order],
        osl=np.asarray(osls, dtype=np.int64)[order],
        duration_s=float(math.floor(arrival[-1]) + 1.0),
    )


def write_trace_jsonl(trace, path: str | Path) -> None:
    """One request a line, the keys `load_trace` reads (arrival_s, isl, osl)."""
    lines = [json.dumps({"arrival_s": round(float(a), 6), "isl": int(i), "osl": int(o)})
             for a, i, o in zip(trace.arrival_s, trace.isl, trace.osl)]
    Path(path).write_text("\n".join(lines) + "\n")


def stack_factors(profile, solo: list, isl: int, osl: int) -> dict[str, float]:
    """Live / profile ratios from solo requests (nothing else running): mean TTFT against
    the profile's prefill TTFT at `isl`, mean TPOT against its batch-1 ITL at the mean
    decode context. The profile times the bare engine; the live stack adds the frontend,
    the RPCs and the worker process around it."""
    ok = [r for r in solo if r.ok and r.ttft is not None and r.tpot is not None]
    if not ok:
        raise ValueError("no solo calibration request completed")
    ttft_ms = 1e3 * sum(r.ttft for r in ok) / len(ok)
    tpot_ms = 1e3 * sum(r.tpot for r in ok) / len(ok)
    prof_ttft = float(profile.prefill_ttft_ms(isl))
    prof_itl = float(profile.decode_itl_ms(1, isl + osl / 2.0))
    return {"prefill": ttft_ms / prof_ttft, "decode": tpot_ms / prof_itl,
            "solo_ttft_ms": ttft_ms, "profile_ttft_ms": prof_ttft,
            "solo_tpot_ms": tpot_ms, "profile_itl_ms": prof_itl, "requests": len(ok)}


def scale_profile(profile, prefill: float, decode: float):
    """`profile` with every prefill time x `prefill` and decode step x `decode` (throughputs
    divided likewise); co-location factors and capacity unchanged."""
    from splitserve.planner.profile import Profile

    d = profile.to_dict()
    d["prefill"]["ttft_ms"] = [v * prefill for v in d["prefill"]["ttft_ms"]]
    d["prefill"]["tok_s"] = [v / prefill for v in d["prefill"]["tok_s"]]
    d["decode"]["itl_ms"] = [[None if v is None else v * decode for v in row] for row in d["decode"]["itl_ms"]]
    d["decode"]["tok_s"] = [[None if v is None else v / decode for v in row] for row in d["decode"]["tok_s"]]
    return Profile.from_dict(d)


def simulate_static(trace, profile, kv_transfer_ms: float = 0.0, decode_dt_s: float = 0.005,
                    colocated: bool = False, prefill_max_batched_tokens: int | None = None):
    """Replay `trace` on fixed pools of 1 prefill and 1 decode replica (no planner);
    `colocated`: the two share the host (the profile's measured co-location slowdowns)."""
    from splitserve.planner.simulator.run import SimConfig, StaticPolicy, simulate

    # SLOs only score attainment, which is not compared here.
    cfg = SimConfig(ttft_ms=1e9, itl_ms=1e9, interval_s=max(1.0, trace.duration_s), startup_s=0.0,
                    decode_dt_s=decode_dt_s, kv_transfer_ms=kv_transfer_ms, colocated=colocated,
                    prefill_max_batched_tokens=prefill_max_batched_tokens)
    return simulate(trace, profile, StaticPolicy("static_1p1d", 1, 1), cfg)


def measured_latencies(results: list) -> dict[str, dict[str, float | None]]:
    """Mean/p50/p90/p99 (ms) of TTFT and of each request's TPOT over the completed requests."""
    from splitserve.bench.common import stats_ms

    ok = [r for r in results if r.ok]
    return {"ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
            "itl_ms": stats_ms([r.tpot for r in ok if r.tpot is not None])}


def rel_error(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or not measured > 0 or not math.isfinite(simulated):
        return None
    return (simulated - measured) / measured


def compare_latencies(measured: dict, simulated: dict, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """`ttft_ms`/`itl_ms` as {measured, simulated} (mean, p50, p90), the relative errors of
    the means, and whether both are within `tolerance`."""
    out: dict[str, Any] = {}
    ok = True
    for key, err_key in (("ttft_ms", "ttft_rel_error"), ("itl_ms", "itl_rel_error")):
        m, s = measured[key], {k: simulated[key].get(k) for k in ("mean", "p50", "p90")}
        out[key] = {"measured": m, "simulated": s}
        err = rel_error(s["mean"], m["mean"])
        out[err_key] = err
        ok = ok and err is not None and abs(err) <= tolerance
    out["within_tolerance"] = ok
    return out


def default_rates(profile, cfg: SimValidateConfig) -> list[float]:
    """rate_fractions x the prefill capacity (prompts/s) of one replica at the mean ISL,
    slowed by the co-located decode worker when the profile measured that."""
    from splitserve.planner.simulator.run import colocation_slowdowns

    mid = (cfg.isl_range[0] + cfg.isl_range[1]) / 2.0
    capacity = float(profile.prefill_tok_s(mid)) / mid
    if cfg.colocated:
        capacity /= colocation_slowdowns(profile)[0]
    return [round(f * capacity, 4) for f in cfg.rate_fractions]


# -- live -----------------------------------------------------------------------------------
def run_rate(cfg: SimValidateConfig, profile, rate: float, k: int, outdir: Path) -> dict[str, Any]:
    """One fresh server driven at `rate`; the trace replayed in the simulator; the comparison."""
    from splitserve.bench.disagg import ServeProcess, _load, drive, make_requests

    flags = [*SERVE_FLAGS, "--model", cfg.model, "--dtype", cfg.dtype, "--num-threads-per-worker", "1",
             "--port", "0", "--kv-transport", cfg.kv_transport, "--max-prefill-queue", str(cfg.max_prefill_queue)]
    t_start = time.perf_counter()
    with ServeProcess(flags, SERVE_WORKERS, outdir / f"serve-{k}.log", cfg.ready_timeout_s) as serve:
        warm = make_requests((32, 64), (4, 4), 2, cfg.seed + 99_991)
        warm += make_requests((600, 600), (4, 4), 2, cfg.seed + 99_992)  # remote path too
        asyncio.run(drive(serve.url, warm, None, 0, cfg.request_timeout_s))
        factors = None
        if cfg.calibrate:
            solo: list = []
            for i, req in enumerate(make_requests((cfg.calibration_isl,) * 2, (cfg.calibration_osl,) * 2,
                                                  cfg.calibration_requests, cfg.seed + 99_993)):
                solo += asyncio.run(drive(serve.url, [req], None, i, cfg.request_timeout_s))[0]
            factors = stack_factors(profile, solo, cfg.calibration_isl, cfg.calibration_osl)
        work = make_requests(cfg.isl_range, cfg.osl_range, cfg.num_requests, cfg.seed * 1000 + k)
        before, load0 = serve.prefill_decisions(), _load()
        results, duration = asyncio.run(drive(serve.url, work, rate, cfg.seed * 1000 + k, cfg.request_timeout_s,
                                              desc=f"live {rate:.3g} rps" if cfg.progress else None))
        after, load1 = serve.prefill_decisions(), _load()
        transport = serve.kv_transport()
    trace = trace_from_results(results, [osl for _, osl in work], name=f"live-{rate:g}rps")
    trace_path = outdir / f"trace-{k}.jsonl"
    write_trace_jsonl(trace, trace_path)
    measured = measured_latencies(results)
    raw = simulate_static(trace, profile, cfg.kv_transfer_ms, cfg.decode_dt_s, cfg.colocated,
                          cfg.prefill_max_batched_tokens)
    sim_profile = profile if factors is None else scale_profile(profile, factors["prefill"], factors["decode"])
    sim = raw if factors is None else simulate_static(trace, sim_profile, cfg.kv_transfer_ms, cfg.decode_dt_s,
                                                      cfg.colocated, cfg.prefill_max_batched_tokens)
    # For reference: the pools model alone (own host per worker, one prompt per prefill step).
    alone = simulate_static(trace, sim_profile, cfg.kv_transfer_ms, cfg.decode_dt_s)
    point = {
        "rate_rps": rate,
        **compare_latencies(measured, {"ttft_ms": sim.ttft_ms, "itl_ms": sim.itl_ms}, cfg.tolerance),
        "stack_calibration": factors,
        "uncalibrated": {
            "ttft_ms": raw.ttft_ms["mean"], "itl_ms": raw.itl_ms["mean"],
            "ttft_rel_error": rel_error(raw.ttft_ms["mean"], measured["ttft_ms"]["mean"]),
            "itl_rel_error": rel_error(raw.itl_ms["mean"], measured["itl_ms"]["mean"]),
        },
        "without_colocation": {
            "ttft_ms": alone.ttft_ms["mean"], "itl_ms": alone.itl_ms["mean"],
            "ttft_rel_error": rel_error(alone.ttft_ms["mean"], measured["ttft_ms"]["mean"]),
            "itl_rel_error": rel_error(alone.itl_ms["mean"], measured["itl_ms"]["mean"]),
        },
        "num_requests": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration,
        "prefill_decisions": {kind: after.get(kind, 0) - before.get(kind, 0) for kind in after},
        "kv_transport": transport,
        "load_avg_start": load0,
        "load_avg_end": load1,
        "trace": str(trace_path),
        "wall_s": time.perf_counter() - t_start,
        "requests": _rows(results, sim),
    }
    logger.info("%.3g rps: TTFT measured %.0f ms simulated %.0f ms (%+.1f%%); ITL measured %.1f ms "
                "simulated %.1f ms (%+.1f%%); load %s", rate, measured["ttft_ms"]["mean"] or math.nan,
                sim.ttft_ms["mean"], 100 * (point["ttft_rel_error"] or math.nan),
                measured["itl_ms"]["mean"] or math.nan, sim.itl_ms["mean"],
                100 * (point["itl_rel_error"] or math.nan), load1)
    return point


def _rows(results: list, sim) -> list[dict[str, Any]]:
    """Per request (arrival order): the measured row of `bench disagg` and the simulated
    TTFT / ITL of the same request."""
    from splitserve.bench.disagg import request_records

    rows = request_records(results)  # sorted by start, as the trace is
    for row, ttft, itl in zip(rows, sim.request_ttft_s.tolist(), sim.request_itl_s.tolist()):
        row["sim_ttft_ms"] = round(ttft * 1e3, 1) if math.isfinite(ttft) else None
        row["sim_tpot_ms"] = round(itl * 1e3, 1) if math.isfinite(itl) else None
    return rows


def run_validation(cfg: SimValidateConfig, outdir: Path) -> dict[str, Any]:
    from splitserve.bench.common import machine_info
    from splitserve.planner.profile import load_profile, resolve_profile_path

    profile_path = resolve_profile_path(cfg.profile)
    profile = load_profile(profile_path)
    rates = list(cfg.rates) if cfg.rates else default_rates(profile, cfg)
    points = [run_rate(cfg, profile, rate, k, outdir) for k, rate in enumerate(rates)]
    report: dict[str, Any] = {
        "bench": "sim-validate",
        "config": asdict(cfg),
        "profile": {"path": str(profile_path),
                    **{k: profile.metadata.get(k) for k in ("model", "dtype", "created_at", "load_average")}},
        "itl_metric": ITL_METRIC,
        "rates": points,
    }
    # Headline: the worst rate (largest error) for each latency.
    for key, err_key in (("ttft_ms", "ttft_rel_error"), ("itl_ms", "itl_rel_error")):
        worst = max(points, key=lambda p: abs(p[err_key]) if p[err_key] is not None else math.inf)
        report[key] = worst[key]
        report[err_key] = worst[err_key]
    report["within_15pct"] = all(
        p[e] is not None and abs(p[e]) <= TOLERANCE for p in points for e in ("ttft_rel_error", "itl_rel_error"))
    report["within_tolerance"] = all(p["within_tolerance"] for p in points)
    report["machine"] = machine_info()
    return report


def register(subparsers) -> None:
    p = subparsers.add_parser("sim-validate",
                              help="simulator vs a live 1 prefill + 1 decode run on the same trace")
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--out-dir", default=None, help="traces and server logs (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="one rate, 24 requests (a few minutes)")
    p.add_argument("--rates", type=float, nargs="+", default=None, help="Poisson rates (req/s)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 40)")
    p.add_argument("--profile", default=None, help="profile JSON (default: the shipped one)")
    p.add_argument("--kv-transfer-ms", type=float, default=0.0,
                   help="KV hand-off the simulator adds (ms; measure with `bench kv-transfer`)")
    p.add_argument("--no-calibration", action="store_true",
                   help="simulate with the bare-engine profile as it is (default: scale it by solo "
                        "requests timed through the live stack before each run)")
    p.add_argument("--no-colocation", action="store_true",
                   help="simulate the workers as if each had its own host (the pools model alone)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-transport", default="auto", choices=TRANSPORT_KINDS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.common import emit

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line a request otherwise
    cfg = SimValidateConfig(
        model=args.model, kv_transport=args.kv_transport,
        rates=tuple(args.rates) if args.rates else None,
        rate_fractions=(0.4,) if args.quick else SimValidateConfig.rate_fractions,
        num_requests=args.num_requests or (24 if args.quick else 40),
        profile=args.profile, kv_transfer_ms=args.kv_transfer_ms, seed=args.seed, quick=args.quick,
        colocated=not args.no_colocation, calibrate=not args.no_calibration,
    )
    outdir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="sim-validate-"))
    outdir.mkdir(parents=True, exist_ok=True)
    report = run_validation(cfg, outdir)
    report["out_dir"] = str(outdir)
    emit(report, args.json_path)
    for p in report["rates"]:
        print(f"{p['rate_rps']:.3g} rps: TTFT {p['ttft_ms']['measured']['mean']:.0f} ms measured, "
              f"{p['ttft_ms']['simulated']['mean']:.0f} simulated ({100 * p['ttft_rel_error']:+.1f}%); "
              f"ITL {p['itl_ms']['measured']['mean']:.1f} ms measured, {p['itl_ms']['simulated']['mean']:.1f} "
              f"simulated ({100 * p['itl_rel_error']:+.1f}%)", file=sys.stderr)
    return 0
