"""`splitserve bench disagg`: SLO accounting, goodput summary and ratio, rates/SLOs from the
solo figures, the report's keys (on fake setups), and one tiny live setup."""

import json
import urllib.error
import urllib.request

import pytest

from splitserve.bench import disagg
from splitserve.bench.disagg import (
    DisaggBenchConfig, aggregate, decisions_from_metrics, goodput_ratio, make_requests,
    summarize_setup,
)
from splitserve.bench.serve import RequestResult
from splitserve.runtime.cli import build_parser


def _req(ttft: float, tpot: float, n: int = 11, **kw) -> RequestResult:
    return RequestResult(input_len=100, output_len=n, ok=True, ttft=ttft, e2e=ttft + (n - 1) * tpot,
                         itls=[tpot] * (n - 1), **kw)


def test_aggregate_counts_each_slo_and_failures():
    results = [
        _req(0.5, 0.05),                              # meets both
        _req(0.5, 0.05),                              # meets both
        _req(3.0, 0.05),                              # TTFT breaks
        _req(0.5, 0.30),                              # ITL (TPOT) breaks
        RequestResult(input_len=100, error="boom"),  # failed: meets neither
    ]
    p = aggregate(results, duration_s=10.0, slo_ttft_ms=1000, slo_itl_ms=100)
    assert (p["num_requests"], p["completed"], p["failed"]) == (5, 4, 1)
    assert p["slo_attainment"] == pytest.approx(2 / 5)
    assert p["ttft_attainment"] == pytest.approx(3 / 5)
    assert p["itl_attainment"] == pytest.approx(3 / 5)
    assert p["goodput_rps"] == pytest.approx(0.2) and p["throughput_rps"] == pytest.approx(0.4)
    assert p["ttft_ms"]["p50"] == pytest.approx(500) and p["ttft_ms"]["max"] == pytest.approx(3000)
    assert p["itl_ms"]["p90"] == pytest.approx(0.05 * 1000 + 0.7 * 250, rel=1e-6)  # TPOT percentiles
    assert p["errors"] == ["boom"]
    rows = disagg.request_records(results)
    assert len(rows) == 5 and rows[2]["ttft_ms"] == 3000.0 and rows[3]["tpot_ms"] == 300.0
    assert rows[4] == {"start_s": 0.0, "isl": 100, "osl": 0, "ok": False, "ttft_ms": None,
                       "tpot_ms": None, "max_gap_ms": None}


def test_tpot_not_gap_p90_is_the_itl_metric():
    # One 2 s stall among 99 fast gaps: the p90 gap stays fast, the TPOT does not.
    r = RequestResult(input_len=100, output_len=101, ok=True, ttft=0.1,
                      itls=[0.02] * 99 + [2.0])
    r.e2e = r.ttft + sum(r.itls)
    p = aggregate([r], duration_s=5.0, slo_ttft_ms=1000, slo_itl_ms=30)
    assert p["itl_gap_p90_ms"]["p50"] == pytest.approx(20) and p["itl_gap_max_ms"]["max"] == pytest.approx(2000)
    assert p["itl_ms"]["p50"] == pytest.approx(39.8)
    assert p["itl_attainment"] == 0.0 and p["goodput_rps"] == 0.0


def test_summary_best_goodput_and_ratio():
    points = [{"rate_rps": 0.1, "goodput_rps": 0.09, "slo_attainment": 1.0},
              {"rate_rps": 0.2, "goodput_rps": 0.15, "slo_attainment": 0.85},
              {"rate_rps": 0.4, "goodput_rps": 0.05, "slo_attainment": 0.2}]
    s = summarize_setup(points, attainment_target=0.9)
    assert s == {"goodput_rps": 0.15, "goodput_at_rate_rps": 0.2, "max_rate_at_target_attainment": 0.1}
    assert summarize_setup([], 0.9)["goodput_rps"] == 0.0
    assert goodput_ratio(0.3, 0.15) == pytest.approx(2.0)
    assert goodput_ratio(0.3, 0.0) is None


def test_decisions_from_metrics():
    text = ('# HELP splitserve_prefill_decisions_total Where\n'
            'splitserve_prefill_decisions_total{kind="remote"} 12.0\n'
            'splitserve_prefill_decisions_total{kind="local"} 1.0\n'
            'splitserve_prefill_decisions_created{kind="local"} 1.7e9\n')
    assert decisions_from_metrics(text) == {"remote": 12.0, "local": 1.0}


def test_workload_ranges_and_reproducible():
    work = make_requests((1024, 2048), (64, 128), 50, seed=3)
    assert all(1024 <= len(p) <= 2048 and 64 <= o <= 128 for p, o in work)
    assert len({len(p) for p, _ in work}) > 10                       # lengths really vary
    assert make_requests((1024, 2048), (64, 128), 50, seed=3) == work
    assert make_requests((1024, 2048), (64, 128), 1, seed=4)[0] != work[0]


@pytest.mark.parametrize("kw", [{"isl_range": (10, 5)}, {"osl_range": (1, 4)}, {"rates": (0.0,)},
                                {"num_requests": 0}, {"slo_itl_ms": -1.0}])
def test_config_rejects(kw):
    with pytest.raises(ValueError):
        DisaggBenchConfig(**kw)


def _fake_run_point(name, cfg, logdir, k, plan, solo_count=1):
    """Stand-in for a live point: aggregated meets TTFT but breaks ITL at the higher rate."""
    CALLS.append((name, k, solo_count))
    solo = {"isl": cfg.mid_isl, "osl": cfg.mid_osl, "count": solo_count, "ttft_ms": 2000.0,
            "tpot_ms": 40.0}
    rates, slo = plan(solo)
    tpot = 0.045 if name == "disaggregated" or k == 0 else 0.2
    results = [_req(1.0, tpot) for _ in range(cfg.num_requests)]
    if name == "aggregated" and k == 0:
        results[0] = _req(1.0, 0.2)
    return {"rate_rps": rates[k], **aggregate(results, cfg.num_requests / rates[k],
                                              slo["ttft_ms"], slo["itl_ms"]),
            "solo": solo, "load_avg_start": [1.0] * 3, "load_avg_end": [1.0] * 3,
            "requests": disagg.request_records(results),
            **({"kv_transport": "nixl"} if name == "disaggregated" else {})}


CALLS: list = []


def test_cli_report_keys_on_fake_setups(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(disagg, "run_point", _fake_run_point)
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    args = build_parser().parse_args(["bench", "disagg", "--quick", "--json", str(out),
                                      "--plot", str(png), "--no-progress"])
    CALLS.clear()
    assert args.func(args) == 0
    # ABBA over the rates; the first point (aggregated) calibrates with 3 solo requests.
    assert CALLS == [("aggregated", 0, 3), ("disaggregated", 0, 1), ("disaggregated", 1, 1),
                     ("aggregated", 1, 1)]
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    # Rates: 0.5x and 1x of 1 / solo TTFT; SLOs: 4x solo TTFT, 1.5x solo TPOT.
    assert report["rates_rps"] == [0.25, 0.5]
    assert report["slo"]["ttft_ms"] == 8000.0 and report["slo"]["itl_ms"] == 60.0
    assert report["slo"]["itl_metric"].startswith("TPOT")
    assert report["calibration"]["setup"] == "aggregated" and report["calibration"]["count"] == 3
    assert report["disaggregated"]["kv_transport"] == "nixl"
    agg, dis = report["aggregated"], report["disaggregated"]
    assert [p["slo_attainment"] for p in agg["rates"]] == [pytest.approx(5 / 6), 0.0]
    assert [p["slo_attainment"] for p in dis["rates"]] == [1.0, 1.0]
    assert agg["goodput_rps"] == pytest.approx(5 / 6 * 0.25) and dis["goodput_rps"] == pytest.approx(0.5)
    assert report["goodput_ratio"] == pytest.approx(dis["goodput_rps"] / agg["goodput_rps"])
    assert report["target_met"] is True and report["goodput_basis"].startswith("best over rates")
    # DistServe's reading: no aggregated rate keeps 0.9 attainment here, so no ratio
    assert dis["max_rate_at_target_attainment"] == 0.5 and agg["max_rate_at_target_attainment"] is None
    assert report["max_rate_ratio_at_target_attainment"] is None
    assert report["workload"] == {"isl": [1024, 2048], "osl": [64, 128], "arrivals": "poisson",
                                  "ignore_eos": True, "num_requests_per_rate": 6}
    assert len(report["load_avg_start"]) == 3
    for p in agg["rates"]:
        assert {"ttft_ms", "itl_ms", "goodput_rps", "ttft_attainment", "itl_attainment"} <= set(p)
        assert set(p["ttft_ms"]) >= {"p50", "p90"}
    # Re-scored at looser ITL SLOs: at 1.5x it is the headline; from 5x (200 ms) on,
    # aggregated meets ITL at both rates too.
    sens = {row["itl_scale"]: row for row in report["itl_slo_sensitivity"]}
    assert sens[1.5]["goodput_ratio"] == pytest.approx(report["goodput_ratio"])
    assert sens[1.5]["itl_ms"] == 60.0 and sens[4.0]["itl_ms"] == 160.0
    assert disagg.itl_slo_sensitivity(report, scales=(5.0,))[0]["goodput_ratio"] == pytest.approx(1.0)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        assert report["plot"] == str(png) and png.stat().st_size > 1000
    else:  # --plot without matplotlib: an error logged, no plot, the rest of the report
        assert "plot" not in report and not png.exists()


def test_flags_override_rates_and_slos(tmp_path, monkeypatch):
    monkeypatch.setattr(disagg, "run_point", _fake_run_point)
    cfg = DisaggBenchConfig(rates=(0.1, 0.3), slo_ttft_ms=5000, slo_itl_ms=50, num_requests=4)
    report = disagg.run_bench(cfg)
    assert report["rates_rps"] == [0.1, 0.3]
    assert (report["slo"]["ttft_ms"], report["slo"]["itl_ms"]) == (5000, 50)
    assert report["slo"]["itl_from"] == "flag"


@pytest.mark.live
def test_live_disaggregated_point_tiny(tmp_path):
    """One real `serve` (1 prefill + 1 decode worker): healthy, timed solo, driven, every
    prompt prefilled remotely (--max-local-prefill-tokens 0: these prompts are short enough
    to prefill locally otherwise), stopped afterwards."""
    from tests.helpers.serve import skip_without_model

    skip_without_model()
    cfg = DisaggBenchConfig(isl_range=(40, 80), osl_range=(3, 6), rates=(4.0,), num_requests=3,
                            slo_ttft_ms=60_000, slo_itl_ms=60_000, progress=False,
                            ready_timeout_s=120, max_local_prefill_tokens=0)

    def plan(solo):
        assert solo["ttft_ms"] > 0 and solo["tpot_ms"] > 0 and solo["isl"] == 60
        return cfg.rates, {"ttft_ms": cfg.slo_ttft_ms, "itl_ms": cfg.slo_itl_ms}

    point = disagg.run_point("disaggregated", cfg, tmp_path, 0, plan)
    assert point["completed"] == 3 and point["slo_attainment"] == 1.0 and point["goodput_rps"] > 0
    assert point["prefill_decisions"] == {"remote": 3, "local": 0}
    assert point["kv_transport"] in ("nixl", "grpc")
    assert len(point["requests"]) == 3 and all(r["ok"] for r in point["requests"])
    with pytest.raises((urllib.error.URLError, OSError)):  # stopped: nothing listens any more
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(point["url"] + "/health",
                                                                          timeout=2)


def test_setups_pin_their_workers_unless_told_not_to():
    from splitserve.bench.disagg import DisaggBenchConfig, serve_flags

    for name in ("aggregated", "disaggregated"):
        assert "--pin-workers" in serve_flags(name, DisaggBenchConfig())
        assert "--pin-workers" not in serve_flags(name, DisaggBenchConfig(pin_workers=False))


def test_disaggregated_setup_takes_the_frontend_routing_flags():
    from splitserve.bench.disagg import DisaggBenchConfig, serve_flags

    flags = serve_flags("disaggregated", DisaggBenchConfig())
    assert "--max-local-prefill-tokens" not in flags and "--max-prefill-queue" not in flags
    flags = serve_flags("disaggregated", DisaggBenchConfig(max_local_prefill_tokens=0, max_prefill_queue=2))
    assert flags[flags.index("--max-local-prefill-tokens") + 1] == "0"
    assert flags[flags.index("--max-prefill-queue") + 1] == "2"
    assert "--max-local-prefill-tokens" not in serve_flags("aggregated", DisaggBenchConfig(max_local_prefill_tokens=0))


def test_both_setups_take_the_kv_cache_dtype():
    from splitserve.bench.disagg import DisaggBenchConfig, serve_flags

    for name in ("aggregated", "disaggregated"):
        for kv in ("bfloat16", "fp8"):
            flags = serve_flags(name, DisaggBenchConfig(kv_cache_dtype=kv))
            assert flags[flags.index("--kv-cache-dtype") + 1] == kv
        flags = serve_flags(name, DisaggBenchConfig())
        assert flags[flags.index("--kv-cache-dtype") + 1] == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        DisaggBenchConfig(kv_cache_dtype="int8")
