"""`splitserve bench kv-transfer` end to end on tiny sizes (both transports, no engine)."""

from __future__ import annotations

import argparse
import json

import pytest

from splitserve.bench import kv_transfer as bench

pytestmark = pytest.mark.live


def test_bench_kv_transfer_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    out = tmp_path / "kv.json"
    args = parser.parse_args([
        "kv-transfer", "--json", str(out), "--sizes", "32,64", "--iters", "1",
        "--no-engine", "--prefill-tok-s", "1000",
    ])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert [r["tokens"] for r in result["sizes"]] == [32, 64]
    for row in result["sizes"]:
        assert row["nixl"]["p50_ms"] > 0 and row["grpc"]["p50_ms"] > 0 and row["torch_copy"]["p50_ms"] > 0
        assert row["prefill_how"] == "--prefill-tok-s"
    for kind in ("nixl", "grpc"):
        notices = result["transports"][kind]["notices"]
        assert notices["received"] == notices["sent"] > 0
    assert result["prefill"]["source"] == "--prefill-tok-s"
    assert result["transfer_fraction_transport"] == "nixl"
    expected = max(r["nixl"]["p50_ms"] / r["prefill_ms"] for r in result["sizes"])
    assert result["transfer_fraction_of_prefill"] == pytest.approx(expected)
