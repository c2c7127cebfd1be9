"""Planner vs. static provisioning on one trace: the `splitserve simulate` report and plot."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from splitserve.planner.config import PlannerConfig
from splitserve.planner.profile import Profile
from splitserve.planner.sla_math import size_pools
from splitserve.planner.simulator.run import PlannerPolicy, SimConfig, SimResult, StaticPolicy, simulate
from splitserve.planner.simulator.traces import Trace

log = logging.getLogger(__name__)

#: What the simulator approximates, stated in every report.
APPROXIMATIONS = (
    "prefill: exact per-request FIFO queues with least-work routing; one prompt at a time per "
    "replica, occupancy isl/prefill_tok_s(isl), first token max(idle TTFT, occupancy) after start",
    "decode: fluid within a time step (every running request advances dt/ITL(batch, mean context) "
    "tokens); admission per request to the least-loaded replica with a free slot and room for "
    "isl+osl KV tokens reserved up front (no preemption)",
    "KV hand-off prefill->decode takes kv_transfer_ms (default 0); no prefix caching",
    "every replica has its own GPU/host: no co-location slowdown (SimConfig.colocated models a "
    "fixed 1:1 pairing on shared CPU hosts, used to validate against a live run on one machine)",
    "the planner observes arrival rate and ISL of arrivals, TTFT of first tokens and ITL of tokens "
    "generated in the interval, OSL of finished requests",
    "GPU-hours are billed over the trace duration; new replicas from the decision, removed ones "
    "until their last request finishes",
)


def static_sizes(
    profile: Profile, rps: float, isl: float, osl: float, pcfg: PlannerConfig
) -> tuple[int, int]:
    """Pool sizes `plan` gives for a fixed load (at least the configured minimums, and 1)."""
    plan = size_pools(
        profile,
        rps=rps,
        isl=isl,
        osl=osl,
        ttft_ms=pcfg.ttft_ms,
        itl_ms=pcfg.itl_ms,
        max_prefill_utilization=pcfg.max_prefill_utilization,
    )
    return (
        max(1, pcfg.min_prefill_replicas, plan.prefill_replicas),
        max(1, pcfg.min_decode_replicas, plan.decode_replicas),
    )


def compare(
    trace: Trace,
    profile: Profile,
    pcfg: PlannerConfig,
    scfg: SimConfig,
    *,
    include_static: bool = True,
) -> tuple[dict[str, Any], dict[str, SimResult]]:
    """Simulate the planner, static-at-peak and static-at-mean on `trace`; returns (report, runs)."""
    t0 = time.perf_counter()
    if pcfg.interval_s != scfg.interval_s:
        pcfg = replace(pcfg, interval_s=scfg.interval_s)
    rates = trace.window_rates(scfg.interval_s)
    isl = float(trace.isl.mean()) if len(trace) else pcfg.default_isl
    osl = float(trace.osl.mean()) if len(trace) else pcfg.default_osl
    peak_rps, mean_rps = float(rates.max()), float(len(trace) / trace.duration_s)

    runs: dict[str, SimResult] = {}
    policy = PlannerPolicy(pcfg, profile)
    runs["planner"] = simulate(trace, profile, policy, scfg)
    log.info("planner: %s", _brief(runs["planner"]))
    statics: dict[str, tuple[int, int]] = {}
    if include_static:
        for name, rps in (("static_peak", peak_rps), ("static_mean", mean_rps)):
            statics[name] = static_sizes(profile, rps, isl, osl, pcfg)
            runs[name] = simulate(trace, profile, StaticPolicy(name, *statics[name]), scfg)
            log.info("%s %s: %s", name, statics[name], _brief(runs[name]))

    report: dict[str, Any] = {
        "trace": {
            "name": trace.name,
            "requests": len(trace),
            "duration_s": trace.duration_s,
            "mean_rps": mean_rps,
            "peak_rps": peak_rps,
            "mean_isl": isl,
            "mean_osl": osl,
        },
        "slo": {"ttft_ms": scfg.ttft_ms, "itl_ms": scfg.itl_ms},
        "sim": asdict(scfg),
        "planner_config": asdict(pcfg),
        "profile": {k: profile.metadata.get(k) for k in ("model", "dtype", "machine", "device", "kv_capacity_tokens")},
    }
    for name, res in runs.items():
        entry = res.summary()
        if name in statics:
            entry["prefill_replicas"], entry["decode_replicas"] = statics[name]
        report[name] = entry
    if "static_peak" in runs:
        peak = runs["static_peak"].gpu_hours
        report["gpu_hours_saving"] = 1.0 - runs["planner"].gpu_hours / peak if peak > 0 else math.nan
    report["approximations"] = list(APPROXIMATIONS)
    report["wall_s"] = time.perf_counter() - t0
    return report, runs


def _brief(r: SimResult) -> str:
    return (
        f"attainment {r.slo_attainment:.3f} (ttft {r.ttft_attainment:.3f}, itl {r.itl_attainment:.3f}), "
        f"{r.gpu_hours:.2f} GPU-h, peak {r.peak_gpus} GPUs, {r.wall_s:.1f}s"
    )


def plot(report: dict[str, Any], runs: dict[str, SimResult], path: str) -> None:
    """Rate, pool sizes and latencies over time; raises ImportError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    planner = runs["planner"].timeline
    t = np.asarray(planner["t"]) / 60.0
    axes[0].plot(t, planner["rps"], label="observed rps", lw=1)
    axes[0].plot(t, planner["predicted_rps"], label="planned-for rps", lw=1, ls="--")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper left")
    for name, res in runs.items():
        tl = res.timeline
        tt = np.asarray(tl["t"]) / 60.0
        axes[1].plot(tt, tl["gpus"], label=f"{name} ({res.gpu_hours:.1f} GPU-h)", lw=1)
    axes[1].set_ylabel("GPUs")
    axes[1].legend(loc="upper left")
    axes[2].plot(t, planner["ttft_ms"], label="planner TTFT", lw=1)
    axes[2].axhline(report["slo"]["ttft_ms"], color="k", ls=":", label="target")
    axes[2].set_ylabel("mean TTFT (ms)")
    axes[2].legend(loc="upper left")
    axes[3].plot(t, planner["itl_ms"], label="planner ITL", lw=1)
    axes[3].axhline(report["slo"]["itl_ms"], color="k", ls=":", label="target")
    axes[3].set_ylabel("mean ITL (ms)")
    axes[3].set_xlabel("minutes")
    axes[3].legend(loc="upper left")
    saving = report.get("gpu_hours_saving")
    title = f"{report['trace']['name']}: planner attainment {runs['planner'].slo_attainment:.3f}"
    if saving is not None:
        title += f", GPU-hours saving vs static peak {saving:.1%}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
