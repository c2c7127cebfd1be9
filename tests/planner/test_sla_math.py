"""The sizing math against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from splitserve.planner.sla_math import (
    decode_capacity,
    erlang_c,
    fit_budget,
    goodput_rps,
    md1_wait_ms,
    mdc_wait_ms,
    prefill_capacity,
    prefill_replicas_needed,
    size_pools,
)

from .factories import analytic_profile


def test_erlang_c_known_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # B(2,1) = 0.2 -> C = 0.2 / 0.6
    assert erlang_c(3, 3.5) == 1.0
    assert erlang_c(4, 0.0) == 0.0


def test_md1_wait_matches_pollaczek_khinchine():
    # M/D/1: Wq = rho S / (2 (1 - rho))
    assert md1_wait_ms(100.0, 0.5) == pytest.approx(50.0)
    assert md1_wait_ms(100.0, 0.8) == pytest.approx(200.0)
    assert math.isinf(md1_wait_ms(100.0, 1.0))
    # pooling: at the same utilisation a larger pool waits less
    assert mdc_wait_ms(100.0, 10, 0.8) < mdc_wait_ms(100.0, 2, 0.8) < md1_wait_ms(100.0, 0.8)


def test_prefill_capacity_single_replica_by_hand(profile):
    # isl 2000: idle TTFT = 20 + 2000/20000 s = 120 ms, service = 100 ms.
    # target 300 ms -> queueing budget 180 ms; M/D/1: rho S / (2 (1 - rho)) = 180
    # -> rho = 2k / (1 + 2k) with k = 1.8 -> 3.6 / 4.6.
    cap = prefill_capacity(profile, 2000, 300.0, max_utilization=0.95)
    assert cap.idle_ttft_ms == pytest.approx(120.0)
    assert cap.service_ms == pytest.approx(100.0)
    assert cap.utilization == pytest.approx(3.6 / 4.6, rel=1e-6)
    assert cap.tok_s == pytest.approx(20000 * 3.6 / 4.6, rel=1e-6)
    assert cap.rps == pytest.approx(10 * 3.6 / 4.6, rel=1e-6)
    assert cap.feasible
    # the utilisation cap binds when the budget is generous
    assert prefill_capacity(profile, 2000, 10_000.0, max_utilization=0.8).utilization == 0.8
    # a correction of 1.5 makes it aim at 200 ms: budget 80 ms, k = 0.8 -> 1.6 / 2.6
    assert prefill_capacity(profile, 2000, 300.0, correction=1.5, max_utilization=0.95).utilization == pytest.approx(
        1.6 / 2.6, rel=1e-6
    )


def test_prefill_infeasible_when_idle_ttft_exceeds_target(profile):
    cap = prefill_capacity(profile, 4096, 100.0, max_utilization=0.9)
    assert not cap.feasible
    assert cap.utilization == 0.9  # best effort at the cap


def test_prefill_replicas_needed_is_smallest_pool_meeting_ttft(profile):
    demand = 100 * 3000.0  # 100 rps of 3000 tokens
    n, cap = prefill_replicas_needed(profile, demand, 3000, 500.0, max_utilization=0.9)
    util = lambda c: demand / (c * 20000.0)  # noqa: E731
    ok = lambda c: util(c) <= 0.9 and 170.0 + mdc_wait_ms(150.0, c, util(c)) <= 500.0  # noqa: E731
    assert ok(n) and not ok(n - 1)
    assert cap.replicas == n
    assert n == math.ceil(demand / cap.tok_s - 1e-9)  # consistent with "ceil(demand / per-replica)"
    assert prefill_replicas_needed(profile, 0.0, 3000, 500.0)[0] == 0


def _flat_profile():
    # ITL independent of context: itl = 10 + 0.5 b, batches 1..64 on a power-of-two grid
    return analytic_profile(
        itl_base_ms=10.0,
        itl_per_seq_ms=0.5,
        itl_per_ktok_ms=0.0,
        batch=(1, 2, 4, 8, 16, 32, 64),
        kv_capacity_tokens=10_000_000,
    )


def test_decode_capacity_by_hand():
    p = _flat_profile()
    # ITL 30 ms -> 10 + 0.5 b <= 30 -> b* = 40
    cap = decode_capacity(p, 3100, 30.0)
    assert cap.batch == 40 and cap.feasible
    assert cap.itl_ms == pytest.approx(30.0)
    # throughput at b=40 interpolates between the rows 32 (32000/26) and 64 (64000/42)
    tps32, tps64 = 32000 / 26, 64000 / 42
    assert cap.tok_s == pytest.approx(tps32 + (40 - 32) / 32 * (tps64 - tps32))
    # decode correction 1.5 aims at 20 ms -> b* = 20
    assert decode_capacity(p, 3100, 30.0, correction=1.5).batch == 20
    # infeasible: batch 1 already takes 10.5 ms
    bad = decode_capacity(p, 3100, 5.0)
    assert not bad.feasible and bad.batch == 1


def test_size_pools_by_hand():
    p = _flat_profile()
    plan = size_pools(p, rps=30, isl=3000, osl=200, ttft_ms=500, itl_ms=30)
    tps40 = 32000 / 26 + (8 / 32) * (64000 / 42 - 32000 / 26)
    assert plan.decode_replicas == math.ceil(30 * 200 / tps40)  # 6000 / 1304.0 -> 5
    assert plan.decode_replicas == 5
    assert plan.prefill_demand_tok_s == 90000
    n, _ = prefill_replicas_needed(p, 90000, 3000, 500)
    assert plan.prefill_replicas == n == 5  # 90000 / (0.9 * 20000) = 5 exactly, wait fits
    assert plan.feasible
    zero = size_pools(p, rps=0, isl=3000, osl=200, ttft_ms=500, itl_ms=30)
    assert (zero.prefill_replicas, zero.decode_replicas) == (0, 0)


@pytest.mark.parametrize(
    "p,d,budget,kw,expected",
    [
        (6, 4, 5, {}, (3, 2)),
        (10, 2, 6, {}, (5, 1)),
        (7, 3, 9, {}, (6, 3)),  # 0.9 -> (6, 2), the spare GPU goes to decode (2/3 < 6/7)
        (10, 1, 5, {"min_decode": 1}, (4, 1)),
        (4, 4, 6, {"prefill_gpus": 2}, (2, 2)),  # 12 GPUs -> 6: 2x2 + 2x1
        (3, 3, 10, {}, (3, 3)),  # under budget: unchanged
        (3, 3, None, {}, (3, 3)),
    ],
)
def test_fit_budget(p, d, budget, kw, expected):
    got = fit_budget(p, d, budget, **kw)
    assert got == expected
    if budget is not None:
        assert got[0] * kw.get("prefill_gpus", 1) + got[1] * kw.get("decode_gpus", 1) <= budget


def test_fit_budget_below_minimums_raises():
    with pytest.raises(ValueError, match="budget"):
        fit_budget(5, 5, 1, min_prefill=1, min_decode=1)


def test_goodput(profile):
    plan = size_pools(profile, rps=20, isl=3000, osl=200, ttft_ms=500, itl_ms=50)
    assert goodput_rps(profile, plan) == pytest.approx(20.0)
    # one decode replica serves fewer than 20 rps within the ITL target
    one = goodput_rps(profile, plan, decode=1)
    assert one == pytest.approx(plan.decode.tok_s / 200)
    assert one < 20
    assert goodput_rps(profile, plan, prefill=0) == 0.0
