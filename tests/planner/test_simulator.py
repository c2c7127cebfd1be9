"""Simulator sanity: traces, exact single-request latencies, monotonicity, the planner in the loop.

Scale (1M requests, ~1,000 GPUs) is a benchmark, not a test: see planner/simulate_cli.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitserve.planner.config import PlannerConfig
from splitserve.planner.simulator.report import compare
from splitserve.planner.simulator.run import PlannerPolicy, SimConfig, StaticPolicy, simulate
from splitserve.planner.simulator.traces import Trace, TraceSpec, generate_trace, load_trace, rate_curve


def one_request(isl=2000, osl=101, at=1.0, duration=60.0):
    return Trace(
        name="one",
        arrival_s=np.array([at]),
        isl=np.array([isl]),
        osl=np.array([osl]),
        duration_s=duration,
    )


def test_traces_are_deterministic_and_shaped():
    spec = TraceSpec(kind="diurnal", duration_s=3600, mean_rps=10, period_s=3600, seed=3)
    a, b = generate_trace(spec), generate_trace(spec)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.isl, b.isl)
    other = generate_trace(TraceSpec(kind="diurnal", duration_s=3600, mean_rps=10, period_s=3600, seed=4))
    assert len(other) != len(a) or not np.array_equal(other.arrival_s, a.arrival_s)
    assert np.all(np.diff(a.arrival_s) >= 0) and a.arrival_s.max() < 3600
    assert len(a) == pytest.approx(36000, rel=0.05)
    rates = a.window_rates(300)
    # trough at the start and end, peak in the middle: 0.4x and 1.6x the mean
    assert rates[0] < 7 and rates[5] > 13
    assert a.isl.min() >= 2100 and a.isl.max() <= 3900
    steady = generate_trace(TraceSpec(kind="steady", duration_s=3600, mean_rps=10, seed=3))
    bursty = generate_trace(TraceSpec(kind="bursty", duration_s=3600, mean_rps=10, period_s=3600, seed=3))
    assert steady.window_rates(300).max() < 12
    assert len(bursty) > len(a)
    # bursts only ever raise the diurnal rate, by up to burst_factor
    base = rate_curve(TraceSpec(kind="diurnal", duration_s=3600, period_s=3600), np.random.default_rng(0))
    burst = rate_curve(TraceSpec(kind="bursty", duration_s=3600, period_s=3600), np.random.default_rng(0))
    ratio = burst / base
    assert ratio.min() == pytest.approx(1.0) and 1.3 <= ratio.max() <= 1.8


def test_load_jsonl_trace_both_conventions(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 2500, "input_length": 100, "output_length": 5},  # Mooncake: ms
        {"arrival_s": 1.0, "isl": 50, "osl": 2},
        {"t": 3.5, "isl": 10, "osl": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tr = load_trace(path)
    assert list(tr.arrival_s) == [0.0, 1.5, 2.5]
    assert list(tr.isl) == [50, 100, 10] and list(tr.osl) == [2, 5, 1]
    assert tr.duration_s == 3.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"isl": 1, "osl": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(bad)


def test_single_request_latencies_match_the_profile(profile):
    tr = one_request(isl=2000, osl=101)
    cfg = SimConfig(ttft_ms=500, itl_ms=50, interval_s=10, decode_dt_s=0.1)
    res = simulate(tr, profile, StaticPolicy("s", 1, 1), cfg)
    assert res.completed == 1
    assert res.ttft_ms["mean"] == pytest.approx(profile.prefill_ttft_ms(2000), rel=1e-9)
    # batch 1, context 2001..2101: ITL = 10 + 0.1 + 0.05 * ctx / 1000 ms
    expected_itl = 10.1 + 0.05 * 2.05
    assert res.itl_ms["mean"] == pytest.approx(expected_itl, rel=0.01)
    assert res.slo_attainment == 1.0
    # static GPU-hours: 2 replicas for 60 s
    assert res.gpu_hours == pytest.approx(2 * 60 / 3600)


def test_prefill_queueing_is_exact_fifo(profile):
    # three 2000-token prompts at t=1 on one replica: service 100 ms each, idle TTFT 120 ms
    tr = Trace("q", np.array([1.0, 1.0, 1.0]), np.array([2000] * 3), np.array([2] * 3), 30.0)
    res = simulate(tr, profile, StaticPolicy("s", 1, 1), SimConfig(ttft_ms=500, itl_ms=50, interval_s=10))
    assert res.ttft_ms["mean"] == pytest.approx((120 + 220 + 320) / 3)
    two = simulate(tr, profile, StaticPolicy("s", 2, 1), SimConfig(ttft_ms=500, itl_ms=50, interval_s=10))
    assert two.ttft_ms["mean"] == pytest.approx((120 + 120 + 220) / 3)


def test_kv_capacity_limits_decode_concurrency():
    from .factories import analytic_profile

    small = analytic_profile(kv_capacity_tokens=5000, batch=(1, 2), context=(256, 1024, 2048))
    # each request reserves 2000 + 200 tokens: two fit, the third waits for a slot
    tr = Trace("kv", np.array([1.0, 1.0, 1.0]), np.array([2000] * 3), np.array([200] * 3), 60.0)
    res = simulate(tr, small, StaticPolicy("s", 3, 1), SimConfig(ttft_ms=5000, itl_ms=1000, interval_s=10))
    assert res.completed == 3
    itl = res.itl_ms
    assert itl["p99"] > 1.5 * itl["p50"]  # the waiting one's mean ITL includes its wait


def test_more_replicas_more_attainment(profile):
    tr = generate_trace(TraceSpec(kind="steady", duration_s=300, mean_rps=20, seed=1))
    cfg = SimConfig(ttft_ms=500, itl_ms=30, interval_s=30, decode_dt_s=1.0)
    runs = [simulate(tr, profile, StaticPolicy("s", p, d), cfg) for p, d in ((2, 1), (3, 1), (5, 3))]
    att = [r.slo_attainment for r in runs]
    assert att == sorted(att)
    assert att[0] < 0.5 and att[-1] > 0.99
    assert [r.gpu_hours for r in runs] == pytest.approx([3 * 300 / 3600, 4 * 300 / 3600, 8 * 300 / 3600])


def test_planner_in_the_loop_saves_gpu_hours_on_diurnal(profile):
    spec = TraceSpec(kind="diurnal", duration_s=1800, mean_rps=12, period_s=1800, amplitude=0.7, seed=2)
    tr = generate_trace(spec)
    pcfg = PlannerConfig(ttft_ms=500, itl_ms=50, interval_s=30)
    scfg = SimConfig(ttft_ms=500, itl_ms=50, interval_s=30, decode_dt_s=1.0)
    report, runs = compare(tr, profile, pcfg, scfg)
    assert report["planner"]["slo_attainment"] > 0.95
    assert report["static_peak"]["slo_attainment"] > 0.99
    assert report["static_mean"]["slo_attainment"] < report["planner"]["slo_attainment"]
    assert report["gpu_hours_saving"] > 0.15
    tl = runs["planner"].timeline
    # the pool follows the load: bigger at the peak (middle) than at the start
    mid = len(tl["t"]) // 2
    assert max(tl["prefill"][mid - 5 : mid + 5]) > tl["prefill"][1]
    json.dumps(report)  # JSON-ready


def test_scale_to_zero_in_simulation(profile):
    # traffic for 5 minutes, a 10-minute gap, then traffic again
    rng = np.random.default_rng(0)
    a1 = np.sort(rng.uniform(0, 300, 1500))
    a2 = np.sort(rng.uniform(900, 1200, 1500))
    arr = np.concatenate([a1, a2])
    tr = Trace("gap", arr, np.full(arr.size, 1000), np.full(arr.size, 50), 1200.0)
    pcfg = PlannerConfig(ttft_ms=2000, itl_ms=50, interval_s=30, scale_to_zero_after_s=120)
    policy = PlannerPolicy(pcfg, profile)
    res = simulate(tr, profile, policy, SimConfig(ttft_ms=2000, itl_ms=50, interval_s=30, startup_s=10))
    assert res.completed == arr.size
    zeros = [t for t, p, d in zip(res.timeline["t"], res.timeline["prefill"], res.timeline["decode"]) if p == d == 0]
    assert zeros and min(zeros) >= 420 and max(zeros) < 960
    assert res.timeline["prefill"][-1] >= 1 or res.timeline["t"][-1] > 1200
    # only the requests caught by the wake-up delay miss their TTFT
    assert res.slo_attainment > 0.9
