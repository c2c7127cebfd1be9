"""`splitserve bench router`: the micro part runs (tiny sizes) and reports its keys."""

import json

from splitserve.runtime.cli import build_parser


def test_bench_router_micro_writes_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = build_parser().parse_args([
        "bench", "router", "--json", str(out), "--quick", "--workers", "4", "--blocks", "3000",
        "--prompt-tokens", "256", "--queries", "40",
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
