"""`splitserve plan`, `simulate` and `planner` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from splitserve.planner import profile as profile_mod
from splitserve.planner.cli import make_plan
from splitserve.planner.cli_common import parse_duration
from splitserve.runtime.cli import main

from .factories import analytic_profile
from .test_observe import FIRST, SECOND

REPO = Path(__file__).resolve().parents[2]


def test_plan_prints_and_writes_json(profile_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        ["plan", "--ttft-ms", "500", "--itl-ms", "50", "--isl", "3000", "--osl", "200", "--rps", "20",
         "--profile", str(profile_path), "--json", str(out)]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert (printed["prefill_replicas"], printed["decode_replicas"]) == (4, 2)
    assert printed["total_gpus"] == 6
    assert printed["goodput_per_gpu_rps"] == pytest.approx(20 / 6)
    assert printed["feasible"] is True and printed["notes"] == []


def test_plan_with_gpu_budget(profile_path, capsys):
    rc = main(
        ["plan", "--ttft-ms", "500", "--itl-ms", "50", "--isl", "3000", "--osl", "200", "--rps", "20",
         "--gpu-budget", "4", "--profile", str(profile_path)]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prefill_replicas"] + r["decode_replicas"] == 4
    assert r["budget_limited"] and r["unconstrained"] == {"prefill_replicas": 4, "decode_replicas": 2}
    assert 0 < r["goodput_rps"] < 20
    assert r["goodput_per_gpu_rps"] == pytest.approx(r["goodput_rps"] / 4)


def test_make_plan_infeasible_ttft_is_explained():
    r = make_plan(analytic_profile(), ttft_ms=100, itl_ms=50, isl=3000, osl=200, rps=5)
    assert r["feasible"] is False and r["goodput_rps"] == 0.0
    assert any("TTFT target" in n for n in r["notes"])


def test_plan_without_profile_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile_mod, "default_profile_path", lambda: tmp_path / "missing.json")
    rc = main(["plan", "--ttft-ms", "500", "--itl-ms", "50", "--isl", "3000", "--osl", "200", "--rps", "20"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no default profile" in err and "--profile" in err


def test_simulate_writes_report(profile_path, tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main(
        ["simulate", "--trace", "diurnal", "--duration", "10m", "--period", "10m", "--rps", "5",
         "--profile", str(profile_path), "--json", str(out), "--decode-dt", "1s"]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("planner", "static_peak", "static_mean"):
        assert 0.0 <= r[key]["slo_attainment"] <= 1.0
        assert r[key]["gpu_hours"] > 0
    assert r["gpu_hours_saving"] == pytest.approx(1 - r["planner"]["gpu_hours"] / r["static_peak"]["gpu_hours"])
    assert r["trace"]["requests"] > 2000
    assert "gpu_hours_saving" in capsys.readouterr().out


def test_simulate_file_trace_and_plot_message(profile_path, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 0.5, "isl": 1000, "osl": 20}) + "\n" for i in range(200)))
    png = tmp_path / "p.png"
    rc = main(["simulate", "--trace", str(trace), "--profile", str(profile_path), "--plot", str(png), "--no-static"])
    assert rc == 0
    captured = capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in captured.err and not png.exists()
    else:
        assert png.stat().st_size > 0
    assert main(["simulate", "--trace", str(tmp_path / "nope.jsonl"), "--profile", str(profile_path)]) == 2


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("500ms", 0.5), ("2m", 120), ("1.5h", 5400), ("7", 7)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_rejects():
    import argparse

    for bad in ("", "0s", "fast", "-3s"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


class _Metrics:
    """A loopback /metrics server whose page advances one step per scrape."""

    def __init__(self, pages):
        self.pages = list(pages)
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = outer.pages[min(outer.hits, len(outer.pages) - 1)].encode()
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_planner_loop_dry_run_records_decisions(profile_path, tmp_path):
    record = tmp_path / "decisions.jsonl"
    with _Metrics([FIRST, SECOND, SECOND]) as m:
        rc = main(
            ["planner", "--ttft-ms", "500", "--itl-ms", "50", "--connector", "dry-run", "--interval", "50ms",
             "--metrics-url", m.url, "--profile", str(profile_path), "--record", str(record), "--max-ticks", "2"]
        )
    assert rc == 0
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert len(lines) == 2
    # first tick: 60 requests in ~50 ms -> a high rate -> scale up from the initial 1/1
    assert lines[0]["before"] == [1, 1]
    assert lines[0]["prefill_replicas"] > 1
    assert lines[1]["before"] == [lines[0]["prefill_replicas"], lines[0]["decode_replicas"]]


def test_planner_unknown_connector_and_missing_profile(profile_path, tmp_path, monkeypatch, capsys):
    rc = main(["planner", "--ttft-ms", "500", "--itl-ms", "50", "--connector", "nope",
               "--metrics-url", "http://127.0.0.1:9/metrics", "--profile", str(profile_path)])
    assert rc == 2 and "unknown connector 'nope'" in capsys.readouterr().err
    monkeypatch.setattr(profile_mod, "default_profile_path", lambda: tmp_path / "missing.json")
    rc = main(["planner", "--ttft-ms", "500", "--itl-ms", "50", "--metrics-url", "http://127.0.0.1:9/metrics"])
    assert rc == 2 and "--profile" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_planner_stops_cleanly_on_signal(profile_path, tmp_path, sig):
    record = tmp_path / "d.jsonl"
    with _Metrics([FIRST, SECOND]) as m:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.runtime.cli", "planner", "--ttft-ms", "500", "--itl-ms", "50",
             "--interval", "100ms", "--metrics-url", m.url, "--profile", str(profile_path), "--record", str(record)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not (record.exists() and record.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert record.exists(), "the planner made no decision"
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out
    assert "planner stopped after" in out
