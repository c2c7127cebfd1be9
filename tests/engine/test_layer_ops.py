"""The native bfloat16 layer ops (engine/csrc/layer_ops.c) against the torch code they
replace, and the model running with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine import native
from splitserve.engine.models.llama import rms_norm
from splitserve.engine.models.rope import RotaryEmbedding
from splitserve.engine.sampling_params import SamplingParams

from .factories import tiny_engine, tiny_model_config

ops = native.load_layer_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no C compiler or no AVX512-BF16: "
                                "the kernel is not used")


def bf16(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3, 300])  # 300 x 576: split over threads
def test_add_rms_norm_equals_torch(rows):
    h, delta, w = bf16(rows, 576, seed=0, scale=3), bf16(rows, 576, seed=1), bf16(576, seed=2)
    want_h = h + delta
    want = rms_norm(want_h, w, 1e-5)
    got = ops.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(h, want_h)  # the residual add is exact, and done in place
    # The float32 mean may sum in another order: rarely an ulp off in the normalised value,
    # which the weight's multiply (a second rounding) can make two, never more.
    two_ulp = want.float().abs() * 2 ** -6 + 1e-30
    assert ((got.float() - want.float()).abs() <= two_ulp).all()
    assert (got != want).float().mean().item() < 0.01
    alone = ops.add_rms_norm(want_h.clone(), None, w, 1e-5)
    assert torch.equal(alone, got)


def test_silu_mul_equals_torch():
    gu = bf16(7, 2 * 1536, seed=3, scale=3)
    want = F.silu(gu[:, :1536]) * gu[:, 1536:]
    assert (ops.silu_mul(gu) != want).sum().item() <= 2


def test_rope_equals_torch_in_place():
    cfg = tiny_model_config(head_dim=64, num_heads=9, num_kv_heads=3)
    rope = RotaryEmbedding(cfg, 512, torch.bfloat16, torch.device("cpu"))
    T, nh, nkv, d = 5, 9, 3, 64
    qkv = bf16(T, (nh + 2 * nkv) * d, seed=4, scale=2)
    positions = torch.tensor([0, 1, 17, 300, 511])
    cos, sin = rope.tables(positions)
    want = rope.apply(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), cos, sin)
    v_before = qkv[:, (nh + nkv) * d :].clone()
    ops.rope_(qkv, nh + nkv, d, positions, rope.cos, rope.sin)
    assert torch.equal(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), want)
    assert torch.equal(qkv[:, (nh + nkv) * d :], v_before)  # v untouched


def test_ops_reject_bad_input():
    with pytest.raises(ValueError, match="bfloat16"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="shapes"):
        ops.add_rms_norm(bf16(2, 8, seed=0), bf16(2, 4, seed=0), bf16(8, seed=0), 1e-5)
    with pytest.raises(ValueError, match="positions"):
        ops.rope_(bf16(2, 64, seed=0), 1, 64, torch.tensor([0, 1], dtype=torch.int32),
                  bf16(8, 64, seed=0), bf16(8, 64, seed=0))


def test_engine_with_ops_matches_engine_without():
    """Whole bf16 engine: greedy tokens with the native ops equal the torch ops' (chunked
    prefill, several requests), and a position past the tables is refused."""
    cfg = tiny_model_config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                            intermediate_size=256)
    prompts = [[(5 * i + 11 * j) % 120 + 3 for j in range(n)] for i, n in enumerate((3, 50, 90))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = []
    for native_ops in (True, False):
        eng = tiny_engine(cfg, dtype="bfloat16", block_size=16, max_num_batched_tokens=32,
                          quantization="none")
        assert eng.runner.model.ops is not None
        if not native_ops:
            eng.runner.model.ops = None
        outs.append(eng.generate(prompts, params))
    assert outs[0] == outs[1]
    model = eng.runner.model
    model.ops = ops
    with pytest.raises(IndexError, match="rotary"):
        model.forward(torch.tensor([3]), torch.tensor([10 ** 6]), eng.runner.kv_cache,
                      eng.runner.attn, None)
