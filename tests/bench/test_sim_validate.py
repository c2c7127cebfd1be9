"""`splitserve bench sim-validate`: trace conversion, the comparison, and one small live run."""

import json

import pytest

from splitserve.bench import sim_validate
from splitserve.bench.serve import RequestResult
from splitserve.bench.sim_validate import (
    SimValidateConfig, compare_latencies, default_rates, measured_latencies, rel_error, scale_profile,
    simulate_static, stack_factors, trace_from_results, write_trace_jsonl,
)
from splitserve.planner.simulator.traces import load_trace
from splitserve.runtime.cli import build_parser
from tests.planner.factories import analytic_profile


def _res(start: float, isl: int, ttft: float = 0.5, tpot: float = 0.05, n: int = 11) -> RequestResult:
    return RequestResult(input_len=isl, output_len=n, ok=True, ttft=ttft, e2e=ttft + (n - 1) * tpot,
                         start=start)


def test_trace_from_results_keeps_the_arrivals_and_lengths(tmp_path):
    results = [_res(2.5, 700), _res(2.0, 600), _res(4.75, 900)]  # as sent: not sorted by start
    tr = trace_from_results(results, [11, 12, 13])
    assert tr.arrival_s.tolist() == [0.0, 0.5, 2.75]
    assert tr.isl.tolist() == [600, 700, 900] and tr.osl.tolist() == [12, 11, 13]
    assert tr.duration_s == 3.0
    path = tmp_path / "t.jsonl"
    write_trace_jsonl(tr, path)
    back = load_trace(path)  # the simulator's own reader
    assert back.arrival_s.tolist() == tr.arrival_s.tolist()
    assert back.isl.tolist() == tr.isl.tolist() and back.osl.tolist() == tr.osl.tolist()
    with pytest.raises(ValueError):
        trace_from_results(results, [11])


def test_measured_latencies_use_tpot_and_skip_failures():
    results = [_res(0, 100, ttft=0.2, tpot=0.04), _res(1, 100, ttft=0.4, tpot=0.06),
               RequestResult(input_len=100, error="boom")]
    m = measured_latencies(results)
    assert m["ttft_ms"]["mean"] == pytest.approx(300) and m["ttft_ms"]["p50"] == pytest.approx(300)
    assert m["itl_ms"]["mean"] == pytest.approx(50)
    assert measured_latencies([])["ttft_ms"]["mean"] is None


def test_compare_latencies_errors_and_tolerance():
    measured = {"ttft_ms": {"mean": 1000.0, "p50": 900.0, "p90": 1500.0},
                "itl_ms": {"mean": 40.0, "p50": 40.0, "p90": 45.0}}
    sim = {"ttft_ms": {"mean": 1100.0, "p50": 1.0, "p90": 2.0, "p99": 3.0},
           "itl_ms": {"mean": 30.0, "p50": 1.0, "p90": 2.0, "p99": 3.0}}
    c = compare_latencies(measured, sim, tolerance=0.15)
    assert c["ttft_rel_error"] == pytest.approx(0.10) and c["itl_rel_error"] == pytest.approx(-0.25)
    assert c["ttft_ms"]["simulated"] == {"mean": 1100.0, "p50": 1.0, "p90": 2.0}
    assert c["ttft_ms"]["measured"]["p90"] == 1500.0
    assert not c["within_tolerance"]
    assert compare_latencies(measured, sim, tolerance=0.3)["within_tolerance"]
    assert rel_error(None, 1.0) is None and rel_error(1.0, 0.0) is None and rel_error(float("nan"), 1.0) is None


def test_simulate_static_single_request_is_the_profile():
    prof = analytic_profile()
    tr = trace_from_results([_res(0.0, 1000)], [101])
    sim = simulate_static(tr, prof, kv_transfer_ms=0.0, decode_dt_s=0.005)
    assert sim.ttft_ms["mean"] == pytest.approx(float(prof.prefill_ttft_ms(1000)), rel=1e-6)
    # ITL over 100 tokens at batch 1 and contexts 1001..1100
    expect = float(prof.decode_itl_ms(1, 1050))
    assert sim.itl_ms["mean"] == pytest.approx(expect, rel=0.01)
    # the KV hand-off delays the second token: adds transfer / (osl - 1) to the mean ITL
    slow = simulate_static(tr, prof, kv_transfer_ms=500.0, decode_dt_s=0.005)
    assert slow.itl_ms["mean"] == pytest.approx(sim.itl_ms["mean"] + 5.0, rel=0.01)


def test_stack_factors_and_scaled_profile():
    prof = analytic_profile()
    isl, osl = 768, 32
    ttft = float(prof.prefill_ttft_ms(isl)) / 1e3
    itl = float(prof.decode_itl_ms(1, isl + osl / 2)) / 1e3
    solo = [_res(0, isl, ttft=1.1 * ttft, tpot=1.2 * itl, n=osl), _res(1, isl, ttft=1.3 * ttft, tpot=1.2 * itl, n=osl),
            RequestResult(input_len=isl, error="boom")]
    f = stack_factors(prof, solo, isl, osl)
    assert f["prefill"] == pytest.approx(1.2) and f["decode"] == pytest.approx(1.2) and f["requests"] == 2
    with pytest.raises(ValueError):
        stack_factors(prof, solo[2:], isl, osl)
    scaled = scale_profile(prof, 1.5, 2.0)
    assert scaled.prefill_ttft_ms(isl) == pytest.approx(1.5 * prof.prefill_ttft_ms(isl))
    assert scaled.prefill_tok_s(isl) == pytest.approx(prof.prefill_tok_s(isl) / 1.5)
    assert scaled.decode_itl_ms(4, 2000) == pytest.approx(2.0 * prof.decode_itl_ms(4, 2000))
    # a lone request simulated on the scaled profile takes the scaled times
    one = _res(0.0, isl, n=osl)
    tr = trace_from_results([one], [osl])
    a, b = simulate_static(tr, prof), simulate_static(tr, scaled)
    assert b.ttft_ms["mean"] == pytest.approx(1.5 * a.ttft_ms["mean"], rel=0.02)
    assert b.itl_ms["mean"] == pytest.approx(2.0 * a.itl_ms["mean"], rel=0.05)


def test_default_rates_are_fractions_of_prefill_capacity():
    from splitserve.planner.profile import Profile
    from tests.planner.factories import analytic_profile_dict

    prof = analytic_profile()
    cfg = SimValidateConfig(isl_range=(500, 1500), rate_fractions=(0.5, 1.0), colocated=False)
    cap = float(prof.prefill_tok_s(1000)) / 1000
    assert default_rates(prof, cfg) == [pytest.approx(0.5 * cap, rel=1e-3), pytest.approx(cap, rel=1e-3)]
    # next to a decode worker the prefill worker runs slower: the rates follow
    d = analytic_profile_dict()
    d["metadata"]["colocation"] = {"prefill_slowdown": 2.0, "decode_slowdown": 1.5}
    slow = Profile.from_dict(d)
    cfg = SimValidateConfig(isl_range=(500, 1500), rate_fractions=(0.5,))
    assert default_rates(slow, cfg) == [pytest.approx(0.25 * cap, rel=1e-3)]
    with pytest.raises(ValueError, match="colocation"):
        default_rates(prof, cfg)
    with pytest.raises(ValueError):
        SimValidateConfig(rates=(0.0,))
    with pytest.raises(ValueError):
        SimValidateConfig(osl_range=(1, 1))


def test_cli_registered():
    args = build_parser().parse_args(["bench", "sim-validate", "--json", "x.json", "--quick", "--kv-transfer-ms", "3"])
    assert args.func is sim_validate.run and args.quick and args.kv_transfer_ms == 3.0


@pytest.mark.live
@pytest.mark.slow
def test_live_simulated_latencies_near_measured(tmp_path):
    """A small live run (1 prefill + 1 decode, 8 requests at a light rate) against the
    simulator with the shipped profile: means within 35 % (the issue's 15 % is the bench's,
    over more requests; 8 requests on a shared machine move more)."""
    from tests.helpers.serve import skip_without_model

    skip_without_model()
    cfg = SimValidateConfig(rate_fractions=(0.4,), num_requests=8, progress=False)
    report = sim_validate.run_validation(cfg, tmp_path)
    json.dumps(report)  # JSON-ready
    (point,) = report["rates"]
    assert point["failed"] == 0 and point["prefill_decisions"].get("local", 0) == 0
    assert abs(point["ttft_rel_error"]) <= 0.35, point
    assert abs(point["itl_rel_error"]) <= 0.35, point
