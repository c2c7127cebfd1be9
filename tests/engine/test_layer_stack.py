"""The decoder stack in one native call (engine/csrc/layer_stack.c) for float32 decode steps:
the same kernels in the same order as LlamaForCausalLM's Python loop, so the same bits —
checked on the real default model through whole generations (every logprob and the cache
bytes equal), with the steps it must leave to the loop, and its refusals."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams

from .factories import tiny_engine

needs_stack = pytest.mark.skipif(
    native.load_layer_stack() is None or native.load_layer_ops_f32() is None
    or native.load_quant_gemm_f32() is None or native.load_paged_decode_f32() is None,
    reason="the float32 kernels are not built here (no compiler or no AVX2/FMA/F16C)")

PROMPTS = [[(37 * i + 11 * j) % 4000 + 300 for j in range(n)] for i, n in enumerate((30, 70, 5))]


def generate(stack: bool, calls: list | None = None, stack_rows: int | None = None, **over):
    eng = Engine(EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16,
                              max_num_batched_tokens=48, progress=False, **over))
    model = eng.runner.model
    assert model.stack is not None, "the default model's float32 projections all qualify"
    if stack_rows is not None:
        model.stack_rows = stack_rows
    if not stack:
        model.stack = None
    elif calls is not None:
        run = model.stack

        class Counting:
            def __call__(self, plan, h, positions, decode):
                calls.append(h.shape[0])
                return run(plan, h, positions, decode)

        model.stack = Counting()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, params)
    got = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).append((o.new_token_ids, o.logprobs))
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
    return eng, got


SETTINGS = [{}, {"kv_cache_dtype": "bfloat16"}, {"kv_cache_dtype": "fp8"},
            {"quantization": "w4a8"}, {"quantization": "w4a8", "kv_cache_dtype": "bfloat16"}]


@needs_stack
@pytest.mark.parametrize("over", SETTINGS, ids=lambda o: "-".join(o.values()) or "default")
def test_the_stack_equals_the_python_loop_bit_for_bit(over):
    """Every token, every logprob (top 3 of each step) and every cached key and value: the
    same with and without the stack, which ran the decode-only steps (the prompts' chunks,
    48 tokens a step, stayed on the loop)."""
    if over.get("quantization") == "w4a8" and native.load_quant_gemm_a8() is None:
        pytest.skip("the w4a8 kernel is not built here")
    calls: list[int] = []
    eng_stack, with_stack = generate(True, calls, **over)
    eng_loop, without = generate(False, **over)
    assert with_stack == without
    assert torch.equal(*(e.runner.kv_cache.view(torch.uint8) for e in (eng_stack, eng_loop)))
    assert calls and set(calls) <= {1, 2, 3}  # decode steps only, one row a request
    assert len(calls) >= 7  # 8 tokens each, the first from a prefill step


@needs_stack
def test_steps_past_the_kernels_rows_stay_on_the_loop():
    """The exact float32 kernel takes up to 64 rows (dense GEMMs beyond), so a bigger decode
    step must not run the stack, or its bits would differ from the loop's; the w4a8 kernel
    takes any. With the limit lowered to 2, the 3-request steps run the loop, and the
    tokens stay the same."""
    calls: list[int] = []
    eng, got = generate(True, calls, stack_rows=2)
    assert calls and max(calls) <= 2
    assert got == generate(False)[1]
    assert Engine(EngineConfig(dtype="float32", num_kv_blocks=8, progress=False)
                  ).runner.model.stack_rows == 64
    if native.load_quant_gemm_a8() is not None:
        eng = Engine(EngineConfig(dtype="float32", quantization="w4a8", num_kv_blocks=8,
                                  progress=False))
        assert eng.runner.model.stack_rows == float("inf")


def test_models_the_stack_cannot_run_have_none():
    """Dense projections (random weights here) or a bfloat16 model: no plan, the loop."""
    assert tiny_engine(quantization="none").runner.model.stack is None
    assert tiny_engine(dtype="bfloat16").runner.model.stack is None


@needs_stack
def test_the_stack_refuses_what_does_not_fit_its_plan():
    eng = Engine(EngineConfig(dtype="float32", num_kv_blocks=64, progress=False))
    model = eng.runner.model
    kern = native.load_paged_decode_f32()
    cache = eng.runner.kv_cache
    table = torch.tensor([[1, 2]])
    lens = torch.tensor([20])
    slots = (torch.tensor([2]), torch.tensor([3]))
    step = kern.prepare(cache, table, lens, 9, 64, *slots, 0.125, 1)
    h = torch.randn(1, 576)
    with pytest.raises(ValueError, match="one prepared decode each"):
        model.stack(model.stack_plan, torch.randn(2, 576), torch.tensor([19, 20]), step)
    with pytest.raises(ValueError, match="one int64 position"):
        model.stack(model.stack_plan, h, torch.tensor([19], dtype=torch.int32), step)
    bad = kern.prepare(cache, table, lens, 9, 64, torch.tensor([cache.shape[0]]), slots[1],
                       0.125, 1)
    before = cache.clone()
    with pytest.raises(RuntimeError, match="layer 0: a slot is outside the cache"):
        model.stack(model.stack_plan, h.clone(), torch.tensor([19]), bad)
    assert torch.equal(cache, before)
    out = model.stack(model.stack_plan, h.clone(), torch.tensor([19]), step)
    assert out.shape == (1, 576) and torch.isfinite(out).all()
