"""Engine-level prefill/decode handoff: pinned prefill blocks, remote-KV requests, fallback."""

import pytest

from splitserve.engine.sampling_params import SamplingParams

from .factories import tiny_engine, tiny_model_config

CFG = tiny_model_config()
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run_prefill(eng, rid, prompt, params):
    eng.add_request(rid, prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}),
                    pin_timeout_s=30.0)
    first = None
    while eng.has_unfinished():
        for o in eng.step():
            first = o.new_token_ids[0]
            # the final output carries the pinned blocks (no second trip to the engine)
            assert o.finished and o.kv_blocks == eng.pinned_blocks(rid)
    return first


def drain(eng, rid):
    toks = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                toks += o.new_token_ids
    return toks


@pytest.mark.parametrize("kv_dtype", ["auto", "bfloat16", "fp8"])
@pytest.mark.parametrize("pull_ok", [True, False])
def test_handoff_matches_aggregated(pull_ok, kv_dtype):
    """The handoff equals one engine's run (with a bfloat16 or float8 cache under the
    float32 model too: the blocks move as they are, half or a quarter of the bytes)."""
    prompt = list(range(3, 30))
    ref = tiny_engine(CFG, kv_cache_dtype=kv_dtype).generate([prompt], GREEDY)[0]
    pre, dec = tiny_engine(CFG, kv_cache_dtype=kv_dtype), tiny_engine(CFG, kv_cache_dtype=kv_dtype)
    first = run_prefill(pre, "r", prompt, GREEDY)
    assert first == ref[0]
    blocks, n = pre.pinned_blocks("r")
    assert n == len(prompt) and len(blocks) == -(-n // 4)
    assert pre.pool.num_free_blocks == pre.pool.num_blocks - len(blocks)

    plan = dec.add_remote_request("r", prompt, GREEDY, first)
    assert [i for i, _ in plan] == list(range(len(blocks)))
    if pull_ok:
        for i, local in plan:  # the transfer, done here as a tensor copy
            dec.runner.kv_cache[local] = pre.runner.kv_cache[blocks[i]]
    assert not dec.has_unfinished()  # waiting for KV does not block the loop
    dec.remote_ready("r", pull_ok)
    assert pre.release_pinned("r")
    out = drain(dec, "r")
    assert [first] + out == ref
    assert pre.pool.num_free_blocks == pre.pool.num_blocks
    assert dec.pool.num_free_blocks == dec.pool.num_blocks


def test_decode_side_prefix_cache_skips_blocks():
    shared = list(range(3, 19))  # 4 full blocks of 4
    dec = tiny_engine(CFG)
    dec.generate([shared + [40, 41]], GREEDY)
    prompt = shared + [50, 51, 52, 53, 54]
    pre = tiny_engine(CFG)
    first = run_prefill(pre, "r", prompt, GREEDY)
    plan = dec.add_remote_request("r", prompt, GREEDY, first)
    assert [i for i, _ in plan] == [4, 5]  # only the blocks past the shared prefix
    blocks, _ = pre.pinned_blocks("r")
    for i, local in plan:
        dec.runner.kv_cache[local] = pre.runner.kv_cache[blocks[i]]
    dec.remote_ready("r", True)
    out = drain(dec, "r")
    assert [first] + out == tiny_engine(CFG).generate([prompt], GREEDY)[0]


def test_pins_expire_and_abort_releases():
    eng = tiny_engine(CFG)
    eng.add_request("a", list(range(3, 20)), SamplingParams(max_tokens=1, temperature=0),
                    pin_timeout_s=0.0)
    eng.add_request("b", list(range(3, 20)), SamplingParams(max_tokens=1, temperature=0),
                    pin_timeout_s=60.0)
    while eng.has_unfinished():
        eng.step()
    assert eng.pool.num_free_blocks < eng.pool.num_blocks
    assert eng.expire_pins() == ["a"]
    eng.abort("b")
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


def test_abort_during_pull_frees_blocks():
    eng = tiny_engine(CFG)
    plan = eng.add_remote_request("r", list(range(3, 20)), GREEDY, 7)
    assert plan
    eng.abort("r")
    assert eng.remote_ready("r", True) is False
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


def test_seeded_sampling_same_as_aggregated():
    prompt = list(range(3, 30))
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    ref = tiny_engine(CFG).generate([prompt], params)[0]
    pre, dec = tiny_engine(CFG), tiny_engine(CFG)
    first = run_prefill(pre, "r", prompt, params)
    blocks, _ = pre.pinned_blocks("r")
    plan = dec.add_remote_request("r", prompt, params, first)
    for i, local in plan:
        dec.runner.kv_cache[local] = pre.runner.kv_cache[blocks[i]]
    dec.remote_ready("r", True)
    assert [first] + drain(dec, "r") == ref


@pytest.mark.parametrize("outcome", ["ok", "fail", "raise"])
async def test_async_generate_remote(outcome):
    from splitserve.engine.async_engine import AsyncEngine

    prompt = list(range(3, 30))
    ref = tiny_engine(CFG).generate([prompt], GREEDY)[0]
    pre = tiny_engine(CFG)
    first = run_prefill(pre, "r", prompt, GREEDY)
    blocks, _ = pre.pinned_blocks("r")
    dec_engine = tiny_engine(CFG)
    dec = AsyncEngine(dec_engine.config, engine=dec_engine)
    await dec.start()
    try:
        async def pull(plan):
            if outcome == "raise":
                raise RuntimeError("transfer broke")
            if outcome == "fail":
                return False
            for i, local in plan:
                dec.engine.runner.kv_cache[local] = pre.runner.kv_cache[blocks[i]]
            return True

        toks = []
        async for o in dec.generate_remote("r", prompt, GREEDY, first, pull):
            toks += o.new_token_ids
        assert [first] + toks == ref
        st = dec.stats()
        assert st.num_free_blocks == st.num_total_blocks
    finally:
        await dec.shutdown()


@pytest.mark.parametrize("case", ["all_cached", "pool_short"])
async def test_async_generate_remote_always_calls_pull(case):
    """With nothing to pull (the prefix is cached here) or no room to pull into (the prompt
    is prefilled here), pull still runs, so the prefill side can free its pinned blocks."""
    from splitserve.engine.async_engine import AsyncEngine

    prompt = list(range(3, 19))  # 4 full blocks of 4
    ref = tiny_engine(CFG).generate([prompt], GREEDY)[0]
    pre = tiny_engine(CFG)
    first = run_prefill(pre, "r", prompt, GREEDY)
    dec_engine = tiny_engine(CFG)
    if case == "all_cached":
        dec_engine.generate([prompt + [40]], SamplingParams(max_tokens=1, temperature=0))
    else:  # a prefill nobody has pulled holds most of the pool until its pins expire (a
        # running request instead could finish, freeing the pool, before the pull is planned)
        hog = [5 + i % 100 for i in range(4 * 62)]  # 62 of the 64 blocks
        dec_engine.add_request("hog", hog, SamplingParams(max_tokens=1, temperature=0),
                               pin_timeout_s=1.5)
        while dec_engine.has_unfinished():
            dec_engine.step()
        assert dec_engine.pool.num_free_blocks < 4
    dec = AsyncEngine(dec_engine.config, engine=dec_engine)
    await dec.start()
    plans = []
    try:
        async def pull(plan):
            plans.append(plan)
            return True

        toks = []
        async for o in dec.generate_remote("r", prompt, GREEDY, first, pull):
            toks += o.new_token_ids
        assert plans == ([[]] if case == "all_cached" else [None])
        assert [first] + toks == ref
    finally:
        await dec.shutdown()


async def test_local_prompt_waits_out_a_pull_without_spinning():
    """A decode worker that prefills only in its idle time (max_prefill_tokens_with_decodes
    0) holds a local prompt while a KV pull is in flight, and its engine thread sleeps
    meanwhile instead of stepping in a busy loop."""
    import asyncio

    from splitserve.engine.async_engine import AsyncEngine

    prompt = list(range(3, 30))
    ref = tiny_engine(CFG).generate([prompt], GREEDY)[0]
    pre = tiny_engine(CFG)
    first = run_prefill(pre, "r", prompt, GREEDY)
    blocks, _ = pre.pinned_blocks("r")
    dec_engine = tiny_engine(CFG, max_prefill_tokens_with_decodes=0)
    steps = []
    real_step = dec_engine.step
    dec_engine.step = lambda: steps.append(1) or real_step()
    dec = AsyncEngine(dec_engine.config, engine=dec_engine)
    await dec.start()
    local_first = asyncio.Event()
    tasks = []  # the local request, started inside the pull
    during = {}  # what the pull saw
    try:
        async def pull(plan):
            await asyncio.sleep(0.05)  # the pull is under way: now a local prompt arrives
            tasks.append(asyncio.ensure_future(run_local()))
            n0 = len(steps)
            await asyncio.sleep(0.4)
            # (checked after the stream: pull's exceptions mean "prefill locally")
            during.update(held=not local_first.is_set(), steps=len(steps) - n0)
            for i, dst in plan:
                dec.engine.runner.kv_cache[dst] = pre.runner.kv_cache[blocks[i]]
            return True

        async def run_local():
            out = []
            async for o in dec.generate("local", list(range(40, 60)), GREEDY):
                local_first.set()
                out += o.new_token_ids
            return out

        toks = []
        async for o in dec.generate_remote("r", prompt, GREEDY, first, pull):
            toks += o.new_token_ids
        assert [first] + toks == ref
        assert during["held"]  # the local prompt waited for the pull
        assert during["steps"] < 100  # ~40 idle wake-ups at 10 ms, not a busy loop
        assert len(await tasks[0]) == GREEDY.max_tokens
        st = dec.stats()
        assert st.num_free_blocks == st.num_total_blocks
    finally:
        await dec.shutdown()
