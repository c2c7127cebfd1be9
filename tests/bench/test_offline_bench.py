"""`splitserve bench offline`'s engine side on a tiny random-weight model: the figures it
reports, the single-stream median over its runs, and a pool left whole."""

import statistics

import pytest

from splitserve.bench import offline
from splitserve.runtime.cli import build_parser

from tests.engine.factories import tiny_engine, tiny_model_config


def test_run_engine_reports_the_single_stream_median_of_its_runs():
    cfg = tiny_model_config(vocab_size=512)  # make_prompts draws ids from 300 up
    engine = tiny_engine(cfg)
    prompts = offline.make_prompts(5, 8, 40, cfg.vocab_size, seed=1)
    out = offline.run_engine(engine, prompts, out_len=6, single_runs=3)
    assert [len(o) for o in out["outputs"]] == [6] * 5  # ignore_eos: every token generated
    runs = out["single_stream_decode_tok_s_runs"]
    assert len(runs) == 3 and all(r > 0 for r in runs)
    assert out["single_stream_decode_tok_s"] == statistics.median(runs)
    assert out["splitserve_output_tok_s"] == pytest.approx(30 / out["splitserve_total_s"])
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_single_stream_runs_must_be_positive():
    args = build_parser().parse_args(["bench", "offline", "--single-stream-runs", "0"])
    with pytest.raises(SystemExit, match="--single-stream-runs must be at least 1"):
        offline.run(args)
