"""The simulation loop: a trace through the two pools, a sizing policy in the loop.

Lifecycle of one run:
1. every request's prefill occupancy and idle TTFT come from the profile (vectorised);
2. the policy picks the initial pool sizes (ready at t = 0);
3. per tick interval [t0, t1): prefill routes the interval's arrivals (exact queues), the
   finished prefills become decode arrivals (after `kv_transfer_ms`), decode advances in
   steps of `decode_dt_s`;
4. at t1 the interval's observations (arrival rate and ISL, TTFT of first tokens in the
   interval, ITL as request-seconds ÷ tokens generated, OSL of finished requests) go to
   the policy; new replicas become ready `startup_s` later (billed from the decision);
   removed ones drain;
5. after the trace ends the loop keeps ticking until every request finished (or
   `drain_limit_s` passed: unfinished requests miss their SLO).

With `SimConfig.colocated` (fixed pools sharing hosts pairwise, CPU serving on one machine)
prefill runs fluid per decode step instead of exact per interval (see
`cluster.ColocatedPrefillPool`), so that each pool's speed can depend on the other's state.

A request meets its SLO when its TTFT ≤ ttft_ms and its mean ITL (last token − first
token) ÷ (osl − 1) ≤ itl_ms. GPU-hours are billed over [0, trace duration].
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from splitserve.planner.config import PlannerConfig
from splitserve.planner.core import Planner
from splitserve.planner.profile import Profile
from splitserve.planner.sla_math import size_pools
from splitserve.planner.simulator.cluster import ColocatedPrefillPool, DecodePool, PrefillPool
from splitserve.planner.simulator.traces import Trace
from splitserve.planner.types import Decision, Observations


@dataclass(frozen=True)
class SimConfig:
    """Simulation settings."""

    #: TTFT target (ms) a request must meet.
    ttft_ms: float
    #: Mean-ITL target (ms) a request must meet.
    itl_ms: float
    #: Policy tick interval (s).
    interval_s: float = 30.0
    #: Time from a scale-up decision until the new replica serves (s); billed meanwhile.
    startup_s: float = 30.0
    #: Decode time step (s); rounded so that it divides the interval.
    decode_dt_s: float = 0.5
    #: Prefill -> decode KV hand-off delay (ms).
    kv_transfer_ms: float = 0.0
    #: Prefill replica i shares its host's cores with decode replica i (CPU serving on one
    #: machine): each slows the other by the profile's measured `metadata.colocation`
    #: slowdowns (`splitserve profile --colocation`). Fixed pools only (static policy).
    colocated: bool = False
    #: Colocated mode: a prefill step's token budget (the engine's --max-num-batched-tokens):
    #: prompts queued together share a step and get their first tokens at its end; None: one
    #: whole prompt per step.
    prefill_max_batched_tokens: int | None = None
    #: GPUs per prefill replica.
    prefill_gpus_per_replica: int = 1
    #: GPUs per decode replica.
    decode_gpus_per_replica: int = 1
    #: Stop this long after the trace ends even if requests are left.
    drain_limit_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "interval_s", "decode_dt_s", "drain_limit_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("startup_s", "kv_transfer_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class Policy(Protocol):
    """Chooses pool sizes: once at the start, then every tick."""

    name: str

    def initial(self, trace: Trace) -> tuple[int, int]: ...

    def decide(self, obs: Observations) -> tuple[int, int]: ...


class StaticPolicy:
    """Fixed pool sizes."""

    def __init__(self, name: str, prefill: int, decode: int) -> None:
        self.name, self.prefill, self.decode = name, int(prefill), int(decode)

    def initial(self, trace: Trace) -> tuple[int, int]:
        return self.prefill, self.decode

    def decide(self, obs: Observations) -> tuple[int, int]:
        return self.prefill, self.decode


class PlannerPolicy:
    """The planner core in the loop; starts at what `plan` says for the first interval."""

    def __init__(self, config: PlannerConfig, profile: Profile, name: str = "planner") -> None:
        self.name = name
        self.planner = Planner(config, profile)
        self.decisions: list[Decision] = []

    def initial(self, trace: Trace) -> tuple[int, int]:
        cfg = self.planner.config
        first = trace.arrival_s < cfg.interval_s
        rate = float(np.count_nonzero(first)) / cfg.interval_s
        if rate <= 0:
            return cfg.min_prefill_replicas, cfg.min_decode_replicas
        plan = size_pools(
            self.planner.profile,
            rps=rate * cfg.headroom,
            isl=float(trace.isl[first].mean()),
            osl=float(trace.osl[first].mean()),
            ttft_ms=cfg.ttft_ms,
            itl_ms=cfg.itl_ms,
            max_prefill_utilization=cfg.max_prefill_utilization,
        )
        return max(cfg.min_prefill_replicas, plan.prefill_replicas), max(cfg.min_decode_replicas, plan.decode_replicas)

    def decide(self, obs: Observations) -> tuple[int, int]:
        d = self.planner.on_tick(obs)
        self.decisions.append(d)
        return d.prefill_replicas, d.decode_replicas


@dataclass
class SimResult:
    """Outcome of one simulated run."""

    policy: str
    requests: int
    completed: int
    slo_attainment: float
    ttft_attainment: float
    itl_attainment: float
    gpu_hours: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    peak_prefill_replicas: int
    peak_decode_replicas: int
    peak_gpus: int
    wall_s: float
    #: Per tick: t, prefill, decode, gpus (billed), rps, ttft_ms, itl_ms, predicted_rps.
    timeline: dict[str, list[float]] = field(default_factory=dict)
    #: Per request, in trace order: TTFT and mean ITL (s; NaN where unfinished or osl = 1).
    request_ttft_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    request_itl_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (without the timeline)."""
        return {
            "policy": self.policy,
            "requests": self.requests,
            "completed": self.completed,
            "slo_attainment": self.slo_attainment,
            "ttft_attainment": self.ttft_attainment,
            "itl_attainment": self.itl_attainment,
            "gpu_hours": self.gpu_hours,
            "ttft_ms": self.ttft_ms,
            "itl_ms": self.itl_ms,
            "peak_prefill_replicas": self.peak_prefill_replicas,
            "peak_decode_replicas": self.peak_decode_replicas,
            "peak_gpus": self.peak_gpus,
            "wall_s": self.wall_s,
        }


def _stats_ms(values_s: np.ndarray) -> dict[str, float]:
    v = values_s[np.isfinite(values_s)] * 1000.0
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def colocation_slowdowns(profile: Profile) -> tuple[float, float]:
    """(prefill, decode) slowdown of co-located replicas, from the profile's measurement."""
    c = profile.metadata.get("colocation")
    try:
        p, d = float(c["prefill_slowdown"]), float(c["decode_slowdown"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(
            "colocated simulation needs a profile with metadata.colocation: measure it with "
            "`splitserve profile --colocation`"
        ) from None
    if not (p >= 1.0 and d >= 1.0):
        raise ValueError(f"colocation slowdowns must be >= 1, got {p}, {d}")
    return p, d


def simulate(trace: Trace, profile: Profile, policy: Policy, cfg: SimConfig) -> SimResult:
    """Run `trace` through the pools under `policy` (see the module docstring)."""
    wall0 = time.perf_counter()
    n = len(trace)
    arr = trace.arrival_s
    isl = trace.isl.astype(np.float64)
    osl = trace.osl.astype(np.float64)
    occ = isl / np.asarray(profile.prefill_tok_s(isl))
    lat = np.maximum(np.asarray(profile.prefill_ttft_ms(isl)) / 1000.0, occ)
    first_token = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    need = isl + osl
    rem = np.maximum(osl - 1.0, 0.0)
    ctx0 = isl + 1.0
    arr_l, occ_l, lat_l = arr.tolist(), occ.tolist(), lat.tolist()

    interval = cfg.interval_s
    steps = max(1, int(math.ceil(interval / cfg.decode_dt_s - 1e-9)))
    dt = interval / steps
    duration = trace.duration_s
    transfer = cfg.kv_transfer_ms / 1000.0
    max_ticks = int(math.ceil((duration + cfg.drain_limit_s) / interval)) + 1
    ttft_sum = np.zeros(max_ticks + 1)
    ttft_cnt = np.zeros(max_ticks + 1)

    prefill = PrefillPool()
    decode = DecodePool(profile)
    p0, d0 = policy.initial(trace)
    prefill.resize(p0, 0.0, 0.0, duration)
    decode.resize(d0, 0.0, 0.0)
    coloc: ColocatedPrefillPool | None = None
    if cfg.colocated:
        coloc_p, coloc_d = colocation_slowdowns(profile)
        coloc = ColocatedPrefillPool(p0, cfg.prefill_max_batched_tokens)

    pend_t = np.zeros(0)
    pend_i = np.zeros(0, dtype=np.int64)
    gpu_s = 0.0
    gp, gd = cfg.prefill_gpus_per_replica, cfg.decode_gpus_per_replica
    tl: dict[str, list[float]] = {
        k: [] for k in ("t", "prefill", "decode", "gpus", "rps", "ttft_ms", "itl_ms", "predicted_rps")
    }
    i = 0
    tick = 0
    t0 = 0.0
    def hand_off(done_idx: np.ndarray) -> tuple[float, int]:
        """Prefills done: count their TTFT, finish one-token requests, queue the rest for decode
        (after the KV transfer). Returns the (OSL sum, count) of the requests finished."""
        nonlocal pend_t, pend_i
        ft = first_token[done_idx]
        b = np.minimum((ft // interval).astype(np.int64), max_ticks)
        np.add.at(ttft_sum, b, ft - arr[done_idx])
        np.add.at(ttft_cnt, b, 1.0)
        single = osl[done_idx] <= 1.0
        osl_s, osl_c = 0.0, 0
        if np.any(single):
            finish[done_idx[single]] = ft[single]
            # one-token requests finish at their first token (counted in the window they land in;
            # approximated here as this window)
            osl_s += float(osl[done_idx[single]].sum())
            osl_c += int(np.count_nonzero(single))
        multi = done_idx[~single]
        if multi.size:
            pend_t = np.concatenate([pend_t, first_token[multi] + transfer])
            pend_i = np.concatenate([pend_i, multi])
            order = np.argsort(pend_t, kind="stable")
            pend_t, pend_i = pend_t[order], pend_i[order]
        return osl_s, osl_c

    while True:
        t1 = t0 + interval
        j = int(np.searchsorted(arr, t1, side="left"))
        osl_sum, osl_cnt = 0.0, 0
        if coloc is None:
            backlog_before = list(prefill.backlog)
            prefill.serve(range(i, j), arr_l, occ_l, lat_l, first_token)
            if prefill.size:
                done_idx = np.concatenate([np.asarray(backlog_before, dtype=np.int64), np.arange(i, j)])
                osl_sum, osl_cnt = hand_off(done_idx)
        n_arrived, isl_arrived = j - i, float(isl[i:j].sum())
        i_step = i
        i = j
        busy_s = tokens = 0.0
        for s in range(steps):
            u = t0 + s * dt
            slowdown = None
            if coloc is not None:
                j_step = j if s == steps - 1 else int(np.searchsorted(arr, u + dt, side="left"))
                coloc.route(np.arange(i_step, j_step), arr, isl, lat)
                i_step = j_step
                fin = coloc.step(u, dt, decode.nrun[: coloc.size] > 0, coloc_p, first_token)
                if fin:
                    o_s, o_c = hand_off(np.asarray(fin, dtype=np.int64))
                    osl_sum += o_s
                    osl_cnt += o_c
                slowdown = 1.0 + (coloc_d - 1.0) * coloc.busy_fraction
            cut = int(np.searchsorted(pend_t, u + dt, side="left"))
            new_i, new_t = pend_i[:cut], pend_t[:cut]
            pend_i, pend_t = pend_i[cut:], pend_t[cut:]
            busy_s += decode.admit(new_i, new_t, u, need, rem, ctx0)
            b_s, tok, done = decode.step(u, dt, finish, slowdown)
            busy_s += b_s
            tokens += tok
            if done.size:
                osl_sum += float(osl[done].sum())
                osl_cnt += int(done.size)
            if u < duration:
                gpu_s += decode.billed * gd * (min(u + dt, duration) - u)
        if t0 < duration:
            gpu_s += prefill.size * gp * (min(t1, duration) - t0)

        k = min(tick, max_ticks)
        obs = Observations(
            timestamp=t1,
            interval_s=interval,
            request_rate=n_arrived / interval,
            mean_isl=isl_arrived / n_arrived if n_arrived else None,
            mean_osl=osl_sum / osl_cnt if osl_cnt else None,
            mean_ttft_ms=float(ttft_sum[k] / ttft_cnt[k] * 1000.0) if ttft_cnt[k] else None,
            mean_itl_ms=busy_s / tokens * 1000.0 if tokens > 0 else None,
            prefill_replicas=prefill.size,
            decode_replicas=decode.size,
        )
        new_p, new_d = policy.decide(obs)
        if coloc is not None and (new_p, new_d) != (prefill.size, decode.size):
            raise ValueError("colocated simulation takes fixed pools (a static policy)")
        prefill.resize(new_p, t1, t1 + cfg.startup_s, duration)
        decode.resize(new_d, t1, t1 + cfg.startup_s)

        tl["t"].append(t1)
        tl["prefill"].append(prefill.size)
        tl["decode"].append(decode.size)
        tl["gpus"].append(prefill.size * gp + decode.billed * gd)
        tl["rps"].append(obs.request_rate)
        tl["ttft_ms"].append(obs.mean_ttft_ms if obs.mean_ttft_ms is not None else math.nan)
        tl["itl_ms"].append(obs.mean_itl_ms if obs.mean_itl_ms is not None else math.nan)
        decisions = getattr(policy, "decisions", None)
        tl["predicted_rps"].append(decisions[-1].predicted_rps if decisions else math.nan)

        tick += 1
        t0 = t1
        idle = (
            i >= n
            and not prefill.backlog
            and (coloc is None or coloc.idle())
            and pend_t.size == 0
            and decode.r_req.size == 0
            and not decode.waiting
        )
        if t0 >= duration and (idle or t0 >= duration + cfg.drain_limit_s):
            break
    gpu_s += prefill.extra_replica_s * gp

    ttft = first_token - arr
    mean_itl = np.where(osl > 1.0, (finish - first_token) / np.maximum(osl - 1.0, 1.0), 0.0)
    eps = 1e-9
    ttft_ok = np.isfinite(ttft) & (ttft <= cfg.ttft_ms / 1000.0 + eps)
    itl_ok = np.isfinite(finish) & (mean_itl <= cfg.itl_ms / 1000.0 + eps)
    completed = int(np.count_nonzero(np.isfinite(finish)))
    denom = max(n, 1)
    return SimResult(
        policy=policy.name,
        requests=n,
        completed=completed,
        slo_attainment=float(np.count_nonzero(ttft_ok & itl_ok)) / denom,
        ttft_attainment=float(np.count_nonzero(ttft_ok)) / denom,
        itl_attainment=float(np.count_nonzero(itl_ok)) / denom,
        gpu_hours=gpu_s / 3600.0,
        ttft_ms=_stats_ms(ttft),
        itl_ms=_stats_ms(np.where(osl > 1.0, mean_itl, np.nan)),
        peak_prefill_replicas=int(max(tl["prefill"] + [p0])),
        peak_decode_replicas=int(max(tl["decode"] + [d0])),
        peak_gpus=int(max(tl["gpus"] + [p0 * gp + d0 * gd])),
        wall_s=time.perf_counter() - wall0,
        timeline=tl,
        request_ttft_s=ttft,
        request_itl_s=np.where(np.isfinite(finish) & (osl > 1.0), mean_itl, np.nan),
    )
