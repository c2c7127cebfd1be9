"""`splitserve bench serve` against the in-process stack (tiny engine): it completes every
request, counts tokens exactly, and computes SLO attainment and goodput."""

import pytest

from splitserve.bench.serve import RequestResult, ServeBenchConfig, make_workload, run_benchmark, summarize
from tests.frontend.fakes import inprocess_stack


def test_workload_lengths_and_shared_prefix():
    cfg = ServeBenchConfig(url="x", num_requests=5, isl=20, osl=7, shared_prefix_len=8, warmup=1)
    work = make_workload(cfg)
    assert len(work) == 6
    assert all(len(p) == 20 and osl == 7 for p, osl in work)
    assert len({tuple(p[:8]) for p, _ in work}) == 1 and len({tuple(p) for p, _ in work}) == 6
    assert make_workload(cfg) == work  # reproducible


def test_slo_accounting():
    cfg = ServeBenchConfig(url="x", slo_ttft_ms=100, slo_itl_ms=10)
    fast = RequestResult(input_len=4, output_len=11, ok=True, ttft=0.05, e2e=0.05 + 10 * 0.005)
    slow_ttft = RequestResult(input_len=4, output_len=11, ok=True, ttft=0.5, e2e=0.55)
    slow_itl = RequestResult(input_len=4, output_len=11, ok=True, ttft=0.05, e2e=0.05 + 10 * 0.02)
    failed = RequestResult(input_len=4, error="boom")
    s = summarize(cfg, [fast, slow_ttft, slow_itl, failed], duration=2.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["slo_attainment"] == 0.25 and s["goodput_rps"] == 0.5
    assert s["output_throughput_tok_s"] == 33 / 2.0
    assert s["errors"] == ["boom"]


@pytest.mark.asyncio
@pytest.mark.parametrize("load", [{"concurrency": 3}, {"rate": 50.0}])
async def test_bench_against_a_live_stack(load):
    async with inprocess_stack(max_model_len=256) as s:
        cfg = ServeBenchConfig(url=s.url, num_requests=6, isl=24, osl=5, shared_prefix_len=8,
                               slo_ttft_ms=10_000, slo_itl_ms=10_000, progress=False,
                               token_id_range=(3, 120), **load)
        summary, results = await run_benchmark(cfg)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["model"] == "tiny"
    assert summary["total_output_tokens"] == 30 and summary["total_input_tokens"] == 144
    assert summary["slo_attainment"] == 1.0 and summary["goodput_rps"] > 0
    assert summary["ttft_ms"]["p50"] > 0 and summary["e2e_ms"]["p99"] >= summary["ttft_ms"]["p99"]


def test_plot_cdfs(tmp_path):
    pytest.importorskip("matplotlib")
    from splitserve.bench.serve import plot_cdfs

    results = [RequestResult(input_len=8, output_len=5, ok=True, ttft=0.01 * i, e2e=0.1 + 0.01 * i)
               for i in range(1, 20)]
    out = tmp_path / "cdf.png"
    plot_cdfs(results, str(out), ServeBenchConfig(url="x", slo_ttft_ms=100, slo_itl_ms=50))
    assert out.stat().st_size > 1000
