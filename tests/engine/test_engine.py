"""Engine on a tiny random-weight Llama: parity with transformers, bad input, no leaks."""

import asyncio

import pytest
import torch

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import EngineInputError
from splitserve.engine.sampling_params import SamplingParams

from .factories import hf_tiny_model, tiny_engine, tiny_model_config


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("over", [
    {},
    {"num_kv_heads": 4},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
])
def test_tiny_parity_with_transformers_chunked_prefix_and_preemption(over):
    cfg = tiny_model_config(**over)
    hf = hf_tiny_model(cfg)
    # Small pool and budget: chunked prefill, prefix hits and preemption all happen.
    eng = tiny_engine(cfg, num_kv_blocks=40, max_num_batched_tokens=24)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 128, (12,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 5, 19, 30, 3)]
    prompts.append(torch.randint(3, 128, (45,), generator=g).tolist())
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = eng.generate(prompts, params)
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(hf, p, 16)
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
    # A second pass hits the prefix cache and still matches.
    outs2 = eng.generate(prompts[:2], params)
    assert outs2 == outs[:2]


@pytest.mark.parametrize("bad,param", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=list(range(3, 600))), "prompt"),
    (dict(max_tokens=510), "max_tokens"),
    (dict(prompt=[5, 100000]), "prompt"),
])
def test_bad_input_names_param_and_engine_goes_on(bad, param):
    eng = tiny_engine()
    eng.add_request("good", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(EngineInputError) as ei:
        eng.add_request("bad", bad.get("prompt", [5, 6, 7]),
                        SamplingParams(max_tokens=bad.get("max_tokens", 4)))
    assert ei.value.param == param
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].finished and outs[-1].request_id == "good"
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
])
def test_sampling_params_validation(kw, param):
    with pytest.raises(EngineInputError) as ei:
        SamplingParams(**kw)
    assert ei.value.param == param


def test_stop_token_and_eos():
    eng = tiny_engine()
    ref = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop = ref[3]
    first = ref.index(stop)
    out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]))[0]
    assert out == ref[: first + 1]


def test_failing_step_fails_only_its_batch_and_loop_goes_on(monkeypatch):
    eng = tiny_engine()
    real = eng.runner.execute
    calls = {"n": 0}

    def flaky(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(out)

    monkeypatch.setattr(eng.runner, "execute", flaky)
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    outs = eng.step()
    assert outs[0].finish_reason == "error" and "boom" in outs[0].error
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
    assert eng.generate([[5, 6]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]


async def test_async_engine_streams_and_abort_frees():
    eng = tiny_engine()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = eng.generate([[5, 6, 7]], params)[0]
    a = AsyncEngine(eng.config, engine=eng)
    await a.start()
    try:

        async def collect(i):
            toks = []
            async for o in a.generate(f"r{i}", [5 + i, 6, 7], params):
                toks += o.new_token_ids
            return toks

        res = await asyncio.gather(*(collect(i) for i in range(4)))
        assert all(len(r) == 6 for r in res)
        assert res[0] == ref
        with pytest.raises(EngineInputError):
            async for _ in a.generate("bad", [], params):
                pass
        gen = a.generate("long", [5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(50):
            await asyncio.sleep(0.02)
            st = a.stats()
            if st.num_running == 0 and st.num_free_blocks == st.num_total_blocks:
                break
        st = a.stats()
        assert st.num_free_blocks == st.num_total_blocks and st.num_running == 0
    finally:
        await a.shutdown()


async def test_async_engine_post_runs_in_order_without_waiting(caplog):
    """post() queues work for the engine thread and returns at once; a failing post is
    logged and the engine goes on."""
    import threading
    import time

    eng = tiny_engine()
    a = AsyncEngine(eng.config, engine=eng)
    await a.start()
    try:
        seen: list[tuple[int, str]] = []
        gate = threading.Event()
        busy = asyncio.create_task(a.call(lambda e: gate.wait(10)))  # the engine thread is held
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        a.post(lambda e: seen.append((1, threading.current_thread().name)))
        a.post(lambda e: 1 / 0)
        a.post(lambda e: seen.append((2, threading.current_thread().name)))
        assert time.monotonic() - t0 < 0.5 and not seen  # nothing ran yet: no waiting
        gate.set()
        await busy
        names = await a.call(lambda e: list(seen))
        assert [n for n, _ in names] == [1, 2]
        assert all(name != threading.current_thread().name for _, name in names)
        assert "posted engine call failed" in caplog.text
        assert a.alive
    finally:
        await a.shutdown()
