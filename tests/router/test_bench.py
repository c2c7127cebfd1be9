"""`splitserve bench router`: the micro part runs (tiny sizes) and reports its keys; the live
part's workload, summary and report keys (its servers replaced by a stub)."""

import json

import pytest

from splitserve.runtime.cli import build_parser


def test_bench_router_micro_writes_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = build_parser().parse_args([
        "bench", "router", "--json", str(out), "--quick", "--workers", "4", "--blocks", "3000",
        "--prompt-tokens", "256", "--queries", "40", "--micro-only",
    ])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    micro = report["micro"]
    assert micro["indexed_blocks"] >= 3000 and micro["workers"] == 4
    assert 0 < report["route_p99_ms"] == micro["route_p99_ms"]
    assert report["ingest_blocks_per_s"] > 0
    assert micro["mean_overlap_blocks"] > 0                 # queries really match the index
    assert set(report["targets"]) == {"route_p99_ms", "ingest_blocks_per_s"}
    assert "skipped" in report["live"]


def test_live_workload_is_shared_prefix_poisson_and_reproducible():
    from splitserve.bench.router_live import LiveConfig, make_workload

    cfg = LiveConfig(num_prefixes=3, prefix_tokens=64, num_requests=200, rate=2.0,
                     user_tokens=(4, 8), max_model_len=128)
    work = make_workload(cfg)
    assert work == make_workload(cfg)
    assert {it.prefix for it in work} == {0, 1, 2}
    heads = {it.prefix: it.prompt[:64] for it in work}
    assert all(it.prompt[:64] == heads[it.prefix] and 68 <= len(it.prompt) <= 72 for it in work)
    gaps = [b.at - a.at for a, b in zip(work, work[1:])]
    assert 0.35 < sum(gaps) / len(gaps) < 0.65            # mean 1 / rate


def test_live_report_keys(monkeypatch, tmp_path):
    from splitserve.bench import router_live

    class StubServer:
        def __init__(self, flags, workers, log_path, ready_timeout_s):
            assert workers == {"decode": 2}
            self.url = f"http://stub/{flags[flags.index('--router-mode') + 1]}"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    ttft = {"kv": 0.1, "round-robin": 0.4, "random": 0.3}

    async def drive(cfg, base, work, progress):
        mode = base.rsplit("/", 1)[1]
        res = [router_live.Result(it.prefix, len(it.prompt), ok=True, ttft=ttft[mode], e2e=1.0,
                                  cached_tokens=len(it.prompt) // 2) for it in work]
        text = f'splitserve_router_prefix_hit_rate 0.5\nsplitserve_router_routed_requests_total{{worker="decode-0"}} {len(work)}.0\n'
        return res, text, 2.0

    monkeypatch.setattr(router_live, "ServeProcess", StubServer)
    monkeypatch.setattr(router_live, "drive", drive)
    out = tmp_path / "r.json"
    args = build_parser().parse_args(["bench", "router", "--json", str(out), "--live-only",
                                      "--live-requests", "5"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["ttft_p50_ms"] == {"kv": 100.0, "round_robin": 400.0, "random": 300.0}
    assert set(report["ttft_p90_ms"]) == {"kv", "round_robin", "random"}
    assert report["prefix_hit_rate"]["kv"] == 0.5
    assert report["targets"]["ttft_p50_round_robin_over_kv"]["met"] is True
    kv = report["live"]["modes"]["kv"]
    assert kv["completed"] == 5 and kv["routed_per_worker"] == {"decode-0": 5.0}
    assert "route_p99_ms" not in report                     # --live-only


@pytest.mark.live
def test_live_part_on_a_real_server_tiny():
    """The live part end to end: real `serve` (2 workers), the real streaming client; the
    repeated system prompts come back as prefix-cache hits the workers report."""
    from splitserve.bench.router_live import LiveConfig, run_live
    from tests.helpers.serve import skip_without_model

    skip_without_model()
    cfg = LiveConfig(modes=("kv",), num_prefixes=2, prefix_tokens=128, num_requests=6,
                     rate=2.0, osl=4, kv_cache_memory="32MiB", max_model_len=512)
    report = run_live(cfg)
    kv = report["modes"]["kv"]
    assert kv["completed"] == 6 and kv["failed"] == 0
    assert report["ttft_p50_ms"]["kv"] > 0
    assert report["prefix_hit_rate"]["kv"] > 0  # 6 requests over 2 prefixes: repeats hit
