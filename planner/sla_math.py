"""The SLO math: TTFT/ITL targets + a profile + a load -> prefill and decode pool sizes.

Pure functions shared by the planner core, `splitserve plan` and the simulator.

Prefill. A replica serves prompts one after another; a prompt of `isl` tokens occupies it
for `S = isl / prefill_tok_s(isl)` and, on an idle replica, gets its first token after
`ttft0 = prefill_ttft_ms(isl)`. The router sends each prompt to the replica with the least
queued work, which makes the pool an M/D/c queue (Poisson arrivals, deterministic service,
c servers): mean TTFT = ttft0 + Wq(c, ρ), with Wq the M/M/c (Erlang C) wait halved for
deterministic service (exact for c = 1: ρ·S / (2(1−ρ))). Let ρ*(c) be the highest
utilisation at which a pool of c replicas still meets the TTFT target T (capped at
`max_utilization`); then the per-replica prefill throughput that still meets TTFT is
ρ*(c)·prefill_tok_s(isl), and

    prefill replicas = the smallest c with c >= ceil(rps · isl / (ρ*(c) · prefill_tok_s(isl)))

(ρ*(c) grows with c — larger pools queue less — so this is a monotone search).

Decode. The context a request has on average while it decodes is `isl + osl/2`. The
largest batch that meets the ITL target at that context (and fits the KV capacity) is
b* = profile.max_decode_batch_meeting_itl(itl, ctx), and

    decode replicas = ceil(rps · osl / decode_tok_s(b*, ctx)).

Corrections. `correction` = observed ÷ modelled latency; the sizing then aims at
`target ÷ correction` (a profile that is 20 % optimistic, correction 1.2, makes the
planner aim 20 % lower).

If a target cannot be met at any size (the idle TTFT already exceeds it, or even a batch
of one misses the ITL), the pool is sized best effort (prefill at `max_utilization`,
decode at batch 1) and the result says `feasible = False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from splitserve.planner.profile import Profile


def md1_wait_ms(service_ms: float, utilization: float) -> float:
    """Mean queueing delay (ms) of an M/D/1 queue; inf at utilisation >= 1."""
    return mdc_wait_ms(service_ms, 1, utilization)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (c servers, offered load a = λS)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0  # Erlang B by the stable recursion B(k) = a·B(k-1) / (k + a·B(k-1))
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1.0 - rho * (1.0 - b))


def mdc_wait_ms(service_ms: float, servers: int, utilization: float) -> float:
    """Mean queueing delay (ms) of an M/D/c queue: half the M/M/c (Erlang C) wait."""
    if servers <= 0 or utilization >= 1.0:
        return math.inf
    if utilization <= 0.0:
        return 0.0
    c = erlang_c(servers, utilization * servers)
    return 0.5 * c * service_ms / (servers * (1.0 - utilization))


def _max_utilization(service_ms: float, servers: int, budget_ms: float, cap: float) -> float:
    """Highest utilisation (<= cap) with M/D/c wait <= budget_ms, by bisection."""
    if mdc_wait_ms(service_ms, servers, cap) <= budget_ms:
        return cap
    lo, hi = 0.0, cap
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if mdc_wait_ms(service_ms, servers, mid) <= budget_ms:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class PrefillCapacity:
    """What one prefill replica can do at one input length under a TTFT target."""

    #: Input length (tokens) this was computed for.
    isl: float
    #: Pool size the utilisation was computed for (queueing depends on it).
    replicas: int
    #: TTFT on an idle replica (ms), from the profile.
    idle_ttft_ms: float
    #: Time a prompt occupies the replica (ms) = isl / raw throughput.
    service_ms: float
    #: Raw prefill throughput (prompt tokens/s).
    raw_tok_s: float
    #: Largest utilisation that keeps the mean TTFT within the (corrected) target.
    utilization: float
    #: Prefill throughput that still meets TTFT (prompt tokens/s) = utilization × raw.
    tok_s: float
    #: The TTFT target can be met at this input length.
    feasible: bool

    @property
    def rps(self) -> float:
        """Requests per second one replica serves within the TTFT target."""
        return self.tok_s / self.isl if self.isl > 0 else math.inf


@dataclass(frozen=True)
class DecodeCapacity:
    """What one decode replica can do at one context length under an ITL target."""

    #: Mean context (tokens) during decode = isl + osl / 2.
    context: float
    #: Largest running batch that meets the (corrected) ITL target (>= 1).
    batch: int
    #: Profiled ITL at that batch (ms).
    itl_ms: float
    #: Decode throughput at that batch (generated tokens/s per replica).
    tok_s: float
    #: The ITL target can be met (batch 1 meets it and fits the KV capacity).
    feasible: bool


@dataclass(frozen=True)
class PoolPlan:
    """Pool sizes for one load, with the inputs and per-replica figures they came from."""

    prefill_replicas: int
    decode_replicas: int
    prefill: PrefillCapacity
    decode: DecodeCapacity
    #: Prompt tokens per second to prefill (rps × isl).
    prefill_demand_tok_s: float
    #: Tokens per second to generate (rps × osl).
    decode_demand_tok_s: float
    #: The load and targets sized for.
    rps: float
    isl: float
    osl: float
    ttft_ms: float
    itl_ms: float
    prefill_correction: float = 1.0
    decode_correction: float = 1.0
    max_prefill_utilization: float = 0.9

    @property
    def feasible(self) -> bool:
        """Both targets can be met by some pool size."""
        return self.prefill.feasible and self.decode.feasible


def prefill_capacity(
    profile: Profile,
    isl: float,
    ttft_ms: float,
    *,
    replicas: int = 1,
    correction: float = 1.0,
    max_utilization: float = 0.9,
) -> PrefillCapacity:
    """Per-replica prefill throughput that still meets `ttft_ms` in a pool of `replicas`."""
    isl = max(float(isl), 1.0)
    replicas = max(int(replicas), 1)
    raw = float(profile.prefill_tok_s(isl))
    idle = float(profile.prefill_ttft_ms(isl))
    service = isl / raw * 1000.0
    target = ttft_ms / max(correction, 1e-9)
    if target <= idle:
        util, feasible = max_utilization, False
    else:
        util, feasible = _max_utilization(service, replicas, target - idle, max_utilization), True
    return PrefillCapacity(isl, replicas, idle, service, raw, util, util * raw, feasible)


def prefill_replicas_needed(
    profile: Profile,
    demand_tok_s: float,
    isl: float,
    ttft_ms: float,
    *,
    correction: float = 1.0,
    max_utilization: float = 0.9,
) -> tuple[int, PrefillCapacity]:
    """Smallest pool meeting `ttft_ms` for `demand_tok_s` prompt tokens/s, and its capacity."""
    one = prefill_capacity(profile, isl, ttft_ms, correction=correction, max_utilization=max_utilization)
    if demand_tok_s <= 0:
        return 0, one
    lowest = _ceil_div(demand_tok_s, max_utilization * one.raw_tok_s)
    if not one.feasible:
        return lowest, replace(one, replicas=lowest)
    budget = ttft_ms / max(correction, 1e-9) - one.idle_ttft_ms

    def ok(c: int) -> bool:
        return mdc_wait_ms(one.service_ms, c, demand_tok_s / (c * one.raw_tok_s)) <= budget

    # The wait falls as the pool grows at fixed load: exponential, then binary search.
    if ok(lowest):
        hi = lowest
    else:
        failed, step = lowest, 1
        limit = 100 * lowest + 1000
        while not ok(lowest + step):
            if lowest + step > limit:
                # An essentially zero queueing budget: best effort at the utilisation cap.
                return lowest, replace(one, replicas=lowest, feasible=False)
            failed, step = lowest + step, step * 2
        lo, hi = failed + 1, lowest + step
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
    return hi, prefill_capacity(
        profile, isl, ttft_ms, replicas=hi, correction=correction, max_utilization=max_utilization
    )


def decode_context(isl: float, osl: float) -> float:
    """Mean context length of a request while it decodes."""
    return max(float(isl), 0.0) + max(float(osl), 0.0) / 2.0


def decode_capacity(
    profile: Profile, context: float, itl_ms: float, *, correction: float = 1.0
) -> DecodeCapacity:
    """Per-replica decode throughput at the largest batch that meets `itl_ms` at `context`."""
    target = itl_ms / max(correction, 1e-9)
    batch = profile.max_decode_batch_meeting_itl(target, context)
    feasible = batch >= 1
    if not feasible:
        batch = 1
    itl = float(profile.decode_itl_ms(batch, context))
    tps = float(profile.decode_tok_s(batch, context))
    if not math.isfinite(itl) or tps <= 0:
        # The context does not even fit one sequence in the KV cache: nothing serves it.
        return DecodeCapacity(context, batch, math.inf, 0.0, False)
    return DecodeCapacity(context, batch, itl, tps, feasible)


def size_pools(
    profile: Profile,
    *,
    rps: float,
    isl: float,
    osl: float,
    ttft_ms: float,
    itl_ms: float,
    prefill_correction: float = 1.0,
    decode_correction: float = 1.0,
    max_prefill_utilization: float = 0.9,
) -> PoolPlan:
    """Replicas of each pool needed for `rps` requests/s of `isl` in and `osl` out."""
    rps = max(float(rps), 0.0)
    p_demand = rps * max(float(isl), 1.0)
    d_demand = rps * max(float(osl), 1.0)
    n_p, pre = prefill_replicas_needed(
        profile, p_demand, isl, ttft_ms, correction=prefill_correction, max_utilization=max_prefill_utilization
    )
    dec = decode_capacity(profile, decode_context(isl, osl), itl_ms, correction=decode_correction)
    n_d = _ceil_div(d_demand, dec.tok_s)
    return PoolPlan(
        n_p, n_d, pre, dec, p_demand, d_demand, rps, float(isl), float(osl), float(ttft_ms), float(itl_ms),
        prefill_correction, decode_correction, max_prefill_utilization,
    )


def _ceil_div(demand: float, per_replica: float) -> int:
    if demand <= 0:
        return 0
    if per_replica <= 0:
        raise ValueError("the profile cannot serve this load at any pool size (zero capacity)")
    # Guard against 3.0000000001 -> 4 from float noise.
    return int(math.ceil(demand / per_replica - 1e-9))


def fit_budget(
    prefill: int,
    decode: int,
    budget: int | None,
    *,
    prefill_gpus: int = 1,
    decode_gpus: int = 1,
    min_prefill: int = 0,
    min_decode: int = 0,
) -> tuple[int, int]:
    """Scale both pools down proportionally so that their GPUs fit `budget` (None: no budget).

    Each pool is multiplied by budget ÷ total and rounded down (never below its minimum);
    the GPUs left over by rounding go back, one replica at a time, to the pool that lost the
    larger share. Raises ValueError if even the minimums do not fit.
    """
    if budget is None or prefill * prefill_gpus + decode * decode_gpus <= budget:
        return prefill, decode
    if min_prefill * prefill_gpus + min_decode * decode_gpus > budget:
        raise ValueError(
            f"GPU budget {budget} is below the minimum pools "
            f"({min_prefill}×{prefill_gpus} + {min_decode}×{decode_gpus} GPUs)"
        )
    total = prefill * prefill_gpus + decode * decode_gpus
    f = budget / total
    p = max(min_prefill, min(prefill, math.floor(prefill * f)))
    d = max(min_decode, min(decode, math.floor(decode * f)))

    def used() -> int:
        return p * prefill_gpus + d * decode_gpus

    # Over (only possible when a minimum lifted a pool): trim the pool with the larger share.
    while used() > budget:
        share_p = p / prefill if prefill else 0.0
        share_d = d / decode if decode else 0.0
        if (share_p >= share_d and p > min_prefill) or d <= min_decode:
            p -= 1
        else:
            d -= 1
    # Under: hand leftovers back to the pool furthest below its wish, while they fit.
    while True:
        cands = []
        if p < prefill and used() + prefill_gpus <= budget:
            cands.append((p / prefill, 0))
        if d < decode and used() + decode_gpus <= budget:
            cands.append((d / decode, 1))
        if not cands:
            break
        _, which = min(cands)
        if which == 0:
            p += 1
        else:
            d += 1
    return p, d


def goodput_rps(profile: Profile, plan: PoolPlan, prefill: int | None = None, decode: int | None = None) -> float:
    """Requests/s served within both SLOs by `prefill`/`decode` replicas (default: the plan's).

    The smaller of the offered load and what each pool serves within its target (the
    prefill capacity is recomputed for the given pool size: queueing depends on it).
    """
    n_p = plan.prefill_replicas if prefill is None else prefill
    n_d = plan.decode_replicas if decode is None else decode
    if not plan.feasible or n_p <= 0 or n_d <= 0 or plan.rps <= 0:
        return 0.0
    pre = prefill_capacity(
        profile,
        plan.isl,
        plan.ttft_ms,
        replicas=n_p,
        correction=plan.prefill_correction,
        max_utilization=plan.max_prefill_utilization,
    )
    cap_p = n_p * pre.rps
    cap_d = n_d * plan.decode.tok_s / max(plan.osl, 1.0)
    return float(min(plan.rps, cap_p, cap_d))
