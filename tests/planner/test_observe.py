"""Observations from Prometheus text."""

from __future__ import annotations

import pytest

from splitserve.planner.observe import (
    MetricsSnapshot,
    PrometheusObserver,
    observations_between,
    parse_metrics,
)


def exposition(ok, err, ttft_sum, ttft_n, itl_sum, itl_n, isl_sum, isl_n, osl_sum, osl_n):
    """Prometheus text as prometheus_client renders it (with buckets and unrelated metrics)."""
    return f"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 123.0
# HELP splitserve_requests_total Finished requests
# TYPE splitserve_requests_total counter
splitserve_requests_total{{status="ok"}} {ok}
splitserve_requests_total{{status="error"}} {err}
# HELP splitserve_requests_created Finished requests
# TYPE splitserve_requests_created gauge
splitserve_requests_created{{status="ok"}} 1.7e9
# HELP splitserve_time_to_first_token_seconds TTFT
# TYPE splitserve_time_to_first_token_seconds histogram
splitserve_time_to_first_token_seconds_bucket{{le="0.1"}} 0.0
splitserve_time_to_first_token_seconds_bucket{{le="+Inf"}} {ttft_n}
splitserve_time_to_first_token_seconds_count {ttft_n}
splitserve_time_to_first_token_seconds_sum {ttft_sum}
# HELP splitserve_inter_token_latency_seconds ITL
# TYPE splitserve_inter_token_latency_seconds histogram
splitserve_inter_token_latency_seconds_bucket{{le="+Inf"}} {itl_n}
splitserve_inter_token_latency_seconds_count {itl_n}
splitserve_inter_token_latency_seconds_sum {itl_sum}
# HELP splitserve_input_tokens Prompt tokens
# TYPE splitserve_input_tokens histogram
splitserve_input_tokens_bucket{{le="+Inf"}} {isl_n}
splitserve_input_tokens_count {isl_n}
splitserve_input_tokens_sum {isl_sum}
# HELP splitserve_output_tokens Output tokens
# TYPE splitserve_output_tokens histogram
splitserve_output_tokens_bucket{{le="+Inf"}} {osl_n}
splitserve_output_tokens_count {osl_n}
splitserve_output_tokens_sum {osl_sum}
"""


FIRST = exposition(100, 4, 30.0, 104, 20.0, 1000, 300000, 100, 20000, 100)
# 30 s later: 60 more requests (58 ok, 2 errors), TTFT 0.25 s each, ITL 40 ms, ISL 2000, OSL 150
SECOND = exposition(158, 6, 30.0 + 60 * 0.25, 164, 20.0 + 9000 * 0.04, 10000, 300000 + 60 * 2000, 160, 20000 + 60 * 150, 160)


def test_parse_sums_labels_and_ignores_other_metrics():
    snap = parse_metrics(FIRST)
    assert snap.requests_total == 104
    assert (snap.ttft_sum_s, snap.ttft_count) == (30.0, 104)
    assert (snap.itl_sum_s, snap.itl_count) == (20.0, 1000)
    assert (snap.isl_sum, snap.isl_count) == (300000, 100)
    assert (snap.osl_sum, snap.osl_count) == (20000, 100)


def test_observations_from_two_scrapes():
    o = observations_between(
        parse_metrics(FIRST), parse_metrics(SECOND), interval_s=30.0, timestamp=1234.0, prefill_replicas=2, decode_replicas=3
    )
    assert o.request_rate == pytest.approx(60 / 30)
    assert o.mean_ttft_ms == pytest.approx(250.0)
    assert o.mean_itl_ms == pytest.approx(40.0)
    assert o.mean_isl == pytest.approx(2000.0)
    assert o.mean_osl == pytest.approx(150.0)
    assert (o.prefill_replicas, o.decode_replicas, o.timestamp) == (2, 3, 1234.0)


def test_no_traffic_gives_none_means():
    snap = parse_metrics(FIRST)
    o = observations_between(snap, snap, interval_s=30.0, timestamp=0.0, prefill_replicas=1, decode_replicas=1)
    assert o.request_rate == 0.0
    assert o.mean_ttft_ms is None and o.mean_itl_ms is None and o.mean_isl is None and o.mean_osl is None


def test_counter_reset_counts_from_zero():
    after_restart = parse_metrics(exposition(10, 0, 2.0, 10, 0.5, 10, 10000, 10, 1000, 10))
    o = observations_between(
        parse_metrics(SECOND), after_restart, interval_s=10.0, timestamp=0.0, prefill_replicas=1, decode_replicas=1
    )
    assert o.request_rate == pytest.approx(1.0)
    assert o.mean_ttft_ms == pytest.approx(200.0)
    assert o.mean_isl == pytest.approx(1000.0)


def test_missing_metrics_are_zero():
    assert parse_metrics("# nothing here\n") == MetricsSnapshot()


def test_observer_baseline_then_differences_and_several_frontends():
    pages = {"http://a/metrics": [FIRST, SECOND], "http://b/metrics": [FIRST, SECOND]}
    calls = []

    def fetch(url, timeout):
        calls.append((url, timeout))
        return pages[url].pop(0)

    obsv = PrometheusObserver(["http://a/metrics", "http://b/metrics"], timeout_s=2.0, fetch=fetch)
    assert obsv.observe(100.0, 1, 1) is None
    o = obsv.observe(130.0, 2, 2)
    assert o is not None
    assert o.interval_s == pytest.approx(30.0)
    assert o.request_rate == pytest.approx(2 * 60 / 30)
    assert o.mean_ttft_ms == pytest.approx(250.0)
    assert calls[0] == ("http://a/metrics", 2.0)
    with pytest.raises(ValueError):
        PrometheusObserver([])


def test_contract_with_the_frontend_metrics():
    """The planner reads exactly what frontend/metrics.py exports."""
    fm_mod = pytest.importorskip("splitserve.frontend.metrics")
    fm = fm_mod.FrontendMetrics()
    before = parse_metrics(fm.render().decode())
    for _ in range(4):
        fm.requests.labels(status="success").inc()
        fm.ttft.observe(0.3)
        fm.input_tokens.observe(1000)
        fm.output_tokens.observe(50)
        for _ in range(49):
            fm.itl.observe(0.02)
    fm.requests.labels(status="error").inc()
    after = parse_metrics(fm.render().decode())
    o = observations_between(before, after, interval_s=5.0, timestamp=5.0, prefill_replicas=1, decode_replicas=1)
    assert o.request_rate == pytest.approx(5 / 5.0)
    assert o.mean_ttft_ms == pytest.approx(300.0)
    assert o.mean_itl_ms == pytest.approx(20.0)
    assert o.mean_isl == pytest.approx(1000.0) and o.mean_osl == pytest.approx(50.0)
