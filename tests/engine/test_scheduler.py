import pytest

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler


def sched(blocks=16, budget=16, seqs=8, chunked=True, bs=4, **over):
    cfg = EngineConfig(model="x", block_size=bs, max_num_batched_tokens=budget, max_num_seqs=seqs,
                       enable_chunked_prefill=chunked, num_kv_blocks=blocks, **over)
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


def scheduled(out):
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def test_prompts_wait_for_a_step_without_decodes():
    """max_prefill_tokens_with_decodes=0: a new prompt does not share a step with a running
    decode (a disaggregated decode worker's local prefill runs in its idle time)."""
    s, pool = sched(budget=16, max_prefill_tokens_with_decodes=0)
    s.add(req("a", 3, max_tokens=3))
    assert scheduled(run_step(s)) == {"a": 3}  # nothing decodes yet: the prompt runs
    s.add(req("b", 12))
    assert scheduled(run_step(s)) == {"a": 1}
    assert s.requests["b"].status is RequestStatus.WAITING
    assert scheduled(run_step(s)) == {"a": 1}  # a's last token
    assert "a" not in s.requests  # finished
    assert scheduled(run_step(s)) == {"b": 12}  # no decodes left: b runs whole
    while s.has_unfinished():
        run_step(s)
    assert pool.num_free_blocks == pool.num_blocks


def test_prompt_tokens_capped_while_decoding_and_shared():
    s, _ = sched(budget=16, max_prefill_tokens_with_decodes=5)
    s.add(req("a", 3, max_tokens=8))
    run_step(s)
    s.add(req("b", 4))
    s.add(req("c", 9))
    # a decodes; b and c share the 5 prompt tokens, first come first served
    assert scheduled(run_step(s)) == {"a": 1, "b": 4, "c": 1}
    assert scheduled(run_step(s)) == {"a": 1, "b": 1, "c": 5}  # b decodes now
    # a held chunk of a running prompt is skipped, not the requests after it
    assert scheduled(run_step(s)) == {"a": 1, "b": 1, "c": 3}


def test_running_prompt_chunk_held_while_others_decode():
    s, _ = sched(budget=4, max_prefill_tokens_with_decodes=0)
    s.add(req("a", 10, max_tokens=5))
    s.add(req("b", 2, max_tokens=5))
    assert scheduled(run_step(s)) == {"a": 4}
    assert scheduled(run_step(s)) == {"a": 4}
    assert scheduled(run_step(s)) == {"a": 2, "b": 2}  # no decodes yet: both prompts run
    assert scheduled(run_step(s)) == {"a": 1, "b": 1}


def test_held_prompt_runs_after_max_hold():
    s, _ = sched(budget=16, max_prefill_tokens_with_decodes=0, max_prefill_hold_s=5.0)
    s.add(req("a", 3, max_tokens=8))
    run_step(s)
    s.add(req("b", 6))
    assert scheduled(run_step(s)) == {"a": 1}
    s.requests["b"].arrival_time -= 5.0  # it has waited its longest
    assert scheduled(run_step(s)) == {"a": 1, "b": 6}


def test_held_prompt_does_not_block_a_resumed_decode_behind_it():
    """A request whose prompt KV arrived from a prefill worker queues at the front; a held
    local prompt ahead of one in the waiting queue must not stop it."""
    s, pool = sched(budget=16, max_prefill_tokens_with_decodes=0)
    s.add(req("a", 3, max_tokens=8))
    run_step(s)
    s.add(req("held", 8))
    remote = req("r", 5)
    remote.append_token(9)
    s.add_remote(remote)
    assert s.kv.allocate(remote, 5)
    s.remote_ready("r", True)
    s.waiting.rotate(-1)  # put the held prompt first
    assert [r.request_id for r in s.waiting] == ["held", "r"]
    assert scheduled(run_step(s)) == {"a": 1, "r": 1}
    assert [r.request_id for r in s.waiting] == ["held"]


def test_kv_pull_in_flight_holds_a_new_prompt():
    """A pull in flight counts as a decode: a local prompt chunk started meanwhile would keep
    the pulled request waiting a whole chunk after its KV arrived."""
    s, pool = sched(budget=16, max_prefill_tokens_with_decodes=0)
    remote = req("r", 5)
    remote.append_token(9)
    s.add_remote(remote)
    assert s.kv.allocate(remote, 5)
    s.add(req("local", 8))
    assert not s.schedule()  # nothing runs while the pull is in flight
    s.remote_ready("r", True)
    assert scheduled(run_step(s)) == {"r": 1}  # the pulled request decodes first
    while s.has_unfinished():
        run_step(s)
    assert pool.num_free_blocks == pool.num_blocks


def test_kv_pull_in_flight_does_not_hold_prompts_without_the_cap():
    s, _ = sched(budget=16)
    remote = req("r", 5)
    remote.append_token(9)
    s.add_remote(remote)
    assert s.kv.allocate(remote, 5)
    s.add(req("local", 8))
    assert scheduled(run_step(s)) == {"local": 8}


def test_prompt_hold_settings_checked():
    with pytest.raises(ValueError, match="max_prefill_tokens_with_decodes"):
        EngineConfig(model="x", max_prefill_tokens_with_decodes=-1)
    with pytest.raises(ValueError, match="max_prefill_hold_s"):
        EngineConfig(model="x", max_prefill_hold_s=float("nan"))
    with pytest.raises(ValueError, match="max_prefill_tokens_per_step"):
        EngineConfig(model="x", max_prefill_tokens_per_step=0)
    with pytest.raises(ValueError, match="needs chunked prefill"):
        EngineConfig(model="x", max_prefill_tokens_per_step=8, enable_chunked_prefill=False)


def test_prompt_tokens_per_step_cap_chunks_every_prompt():
    s, pool = sched(budget=16, max_prefill_tokens_per_step=5)
    s.add(req("a", 7, max_tokens=3))
    s.add(req("b", 3, max_tokens=3))
    assert scheduled(run_step(s)) == {"a": 5}
    assert scheduled(run_step(s)) == {"a": 2, "b": 3}
    assert scheduled(run_step(s)) == {"a": 1, "b": 1}  # decodes are not prompt tokens
    while s.has_unfinished():
        run_step(s)
    assert pool.num_free_blocks == pool.num_blocks


def test_both_prompt_caps_and_the_hold():
    s, _ = sched(budget=16, max_prefill_tokens_per_step=6, max_prefill_tokens_with_decodes=2,
                 max_prefill_hold_s=5.0)
    s.add(req("a", 3, max_tokens=8))
    run_step(s)
    s.add(req("old", 10))
    s.add(req("new", 10))
    s.requests["old"].arrival_time -= 5.0
    # the old prompt is past its hold: only the per-step cap applies to it
    assert scheduled(run_step(s)) == {"a": 1, "old": 6}
    assert scheduled(run_step(s)) == {"a": 1, "old": 4, "new": 2}
