import pytest

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler


def sched(blocks=16, budget=16, seqs=8, chunked=True, bs=4):
    cfg = EngineConfig(model="x", block_size=bs, max_num_batched_tokens=budget, max_num_seqs=seqs,
                       enable_chunked_prefill=chunked, num_kv_blocks=blocks)
    pool = BlockPool(blocks)
    return Scheduler(cfg, KVCacheManager(pool, bs), max_model_len=1024), pool


def req(rid, n, max_tokens=4):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(s, token=7):
    out = s.schedule()
    sampled = {x.request.request_id: token for x in out.scheduled if x.samples}
    s.update(out, sampled)
    return out


def test_token_budget_and_chunked_prefill():
    s, pool = sched(budget=10)
    s.add(req("a", 25))
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens, x.start) for x in out.scheduled] == [("a", 10, 0)]
    assert not out.scheduled[0].samples
    s.update(out, {})
    out = s.schedule()
    assert (out.scheduled[0].num_new_tokens, out.scheduled[0].start) == (10, 10)
    s.update(out, {})
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 5 and out.scheduled[0].samples


def test_decodes_mix_with_prefill_chunks():
    s, _ = sched(budget=8)
    s.add(req("a", 3))
    run_step(s)  # a prefilled, one token out
    s.add(req("b", 20))
    out = s.schedule()
    got = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"a": 1, "b": 7}
    assert out.num_tokens <= 8


def test_no_chunking_waits_for_whole_prompt():
    s, _ = sched(budget=8, chunked=False)
    s.add(req("a", 3))
    run_step(s)
    s.add(req("b", 8))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a"]  # b (8) does not fit in 7


def test_max_num_seqs_cap():
    s, _ = sched(seqs=2, budget=64, blocks=64)
    for i in range(4):
        s.add(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_preemption_by_recompute_and_no_leak():
    # 4 blocks of 4 tokens: two requests of 6 tokens growing to 6+6 need 3 blocks each.
    s, pool = sched(blocks=4, budget=32)
    a, b = req("a", 6, max_tokens=6), req("b", 6, max_tokens=6)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(100):
        if not s.has_unfinished():
            break
        out = run_step(s)
        preempted += out.preempted
    assert not s.has_unfinished()
    assert preempted, "expected a preemption"
    assert a.status is RequestStatus.FINISHED_LENGTH and b.status is RequestStatus.FINISHED_LENGTH
    assert len(a.output_token_ids) == 6 and len(b.output_token_ids) == 6
    assert pool.num_free_blocks == pool.num_blocks


def test_abort_frees_blocks():
    s, pool = sched()
    s.add(req("a", 10))
    run_step(s)
    assert pool.num_free_blocks < pool.num_blocks
    s.abort("a")
    assert pool.num_free_blocks == pool.num_blocks and not s.has_unfinished()


def test_duplicate_id_rejected():
    s, _ = sched()
    s.add(req("a", 3))
    with pytest.raises(ValueError):
        s.add(req("a", 3))
