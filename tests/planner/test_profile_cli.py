"""`splitserve profile` on the real default model, on a tiny grid."""

import json

import pytest

from splitserve.planner.profile import load_profile
from splitserve.runtime.cli import main


@pytest.mark.live
def test_profile_command_writes_a_valid_profile(tmp_path):
    out = tmp_path / "p.json"
    rc = main(["profile", "--json", str(out), "--isl", "32", "96", "--batch", "1", "3",
               "--context", "32", "64", "--decode-steps", "2", "--kv-cache-memory", "16MiB"])
    assert rc == 0
    prof = load_profile(out)
    data = json.loads(out.read_text())
    assert data["metadata"]["threads"] == 1 and data["metadata"]["model"] == "smollm2-135m"
    assert all(v > 0 for v in data["prefill"]["ttft_ms"])
    # Longer prompts take longer to prefill.
    assert data["prefill"]["ttft_ms"][1] > data["prefill"]["ttft_ms"][0]
    assert all(v is not None and v > 0 for row in data["decode"]["itl_ms"] for v in row)
    assert prof.decode_itl_ms(1, 32) > 0


@pytest.mark.live
def test_colocation_neighbour_runs_until_stopped():
    """The co-location neighbour (`python -m splitserve.planner.colocation`) loads the model,
    says ready, keeps a decode batch busy, and exits on SIGTERM."""
    import argparse

    from splitserve.engine.cli import add_engine_args
    from splitserve.planner.colocation import _Neighbour

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--dtype", "auto"])
    with _Neighbour("decode", args) as n:
        assert n.proc.poll() is None
    assert n.proc.returncode == 0


def test_best_over_passes_keeps_each_cells_lowest_figure():
    """A slow spell in one sweep moves no cell: each keeps its lower figure; a cell measured
    as None (beyond capacity) stays out."""
    from splitserve.planner.profile_cli import best_over_passes

    sweeps = iter([{"a": 10.0, "b": 30.0, "c": None},   # a slow spell over b
                   {"a": 25.0, "b": 12.0, "c": None}])  # then over a
    current = {}

    def measure(cell):
        if cell == "a":
            current.update(next(sweeps))
        return current[cell]

    best = best_over_passes(2, ["a", "b", "c"], measure, lambda xs, **_: xs, "decode")
    assert best == {"a": 10.0, "b": 12.0}
    assert best_over_passes(1, ["a"], lambda c: 5.0, lambda xs, **_: xs, "x") == {"a": 5.0}


def test_profile_refuses_zero_passes(capsys):
    with pytest.raises(SystemExit, match="--passes"):
        main(["profile", "--json", "/dev/null", "--passes", "0"])
