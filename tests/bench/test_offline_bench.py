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


def test_a_kv_cache_dtype_the_model_cannot_take_is_refused():
    args = build_parser().parse_args(["bench", "offline", "--quick", "--dtype", "bfloat16",
                                      "--kv-cache-dtype", "float32"])
    with pytest.raises(SystemExit, match="float32 under a bfloat16 model: use auto"):
        offline.run(args)


def test_the_default_kv_budget_holds_the_whole_set_at_once(monkeypatch):
    """kv_bytes_for: an engine given exactly that many bytes runs every request of the set
    side by side (none preempted), and one block fewer a request does not fit."""
    import torch

    from splitserve.engine import scheduler as sched
    from splitserve.engine.model_runner import kv_block_bytes

    cfg = tiny_model_config(vocab_size=512)
    prompts = offline.make_prompts(6, 20, 60, cfg.vocab_size, seed=2)
    need = offline.kv_bytes_for(prompts, 9, cfg, 16, torch.float32)
    per_block = kv_block_bytes(cfg, 16, torch.float32)
    assert need == sum(-(-(len(p) + 9) // 16) for p in prompts) * per_block
    preempted = []
    real = sched.Scheduler._preempt

    def count(self, req):
        preempted.append(req.request_id)
        return real(self, req)

    monkeypatch.setattr(sched.Scheduler, "_preempt", count)

    def engine(kv_bytes):
        return tiny_engine(cfg, kv_cache_memory=kv_bytes, num_kv_blocks=None, block_size=16,
                           max_num_seqs=64, max_num_batched_tokens=512)

    full = engine(need)
    assert full.pool.num_blocks * per_block == need
    offline.run_engine(full, prompts, out_len=9, single_runs=1)
    assert preempted == []
    offline.run_engine(engine(need - len(prompts) * per_block), prompts, out_len=9, single_runs=1)
    assert preempted, "a cache short of the set's size should have preempted a request"
