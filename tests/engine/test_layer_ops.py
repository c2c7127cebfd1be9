"""The native layer ops (engine/csrc/layer_ops.c: bfloat16 with AVX512-BF16, float32 with
AVX2) against the torch code they replace, and the model running with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine import native
from splitserve.engine.models.llama import rms_norm
from splitserve.engine.models.rope import RotaryEmbedding
from splitserve.engine.sampling_params import SamplingParams

from .factories import built_kernel, tiny_engine, tiny_model_config

#: name -> (the ops or None where not built, their dtype, the float32 mantissa bits of
#: that dtype's ulp: 2^-7 relative for bfloat16, 2^-23 for float32).
OPS = {
    "bf16": (native.load_layer_ops(), torch.bfloat16, 7),
    "f32": (native.load_layer_ops_f32(), torch.float32, 23),
}


@pytest.fixture(params=sorted(OPS))
def kind(request):
    """Each one built here: its OPS entry."""
    return built_kernel(OPS, request.param, "layer ops")


def rand(*shape, seed, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("rows", [1, 3, 300])  # 300 x 576: split over threads
@pytest.mark.parametrize("width", [576, 100])  # 100: a scalar tail after the vectors
def test_add_rms_norm_equals_torch(kind, rows, width):
    ops, dt, bits = kind
    h, delta = rand(rows, width, seed=0, scale=3, dtype=dt), rand(rows, width, seed=1, dtype=dt)
    w = rand(width, seed=2, dtype=dt)
    want_h = h + delta
    want = rms_norm(want_h, w, 1e-5)
    got = ops.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(h, want_h)  # the residual add is exact, and done in place
    # The float32 mean may sum in another order. bfloat16: rarely an ulp off in the
    # normalised value, which the weight's multiply (a second rounding) can make two, never
    # more. float32: the statistic's own last bits differ, so 1/sqrt may be an ulp or two
    # off before those two roundings (measured: up to 3 ulp).
    ulps = 2 if dt == torch.bfloat16 else 4
    bound = want.float().abs() * ulps * 2.0 ** -bits + 1e-30
    assert ((got.float() - want.float()).abs() <= bound).all()
    if dt == torch.bfloat16:
        assert (got != want).float().mean().item() < 0.01
    alone = ops.add_rms_norm(want_h.clone(), None, w, 1e-5)
    assert torch.equal(alone, got)


def test_silu_mul_equals_torch(kind):
    ops, dt, bits = kind
    gu = rand(7, 2 * 1536 + 6, seed=3, scale=3, dtype=dt)  # 1539 wide: a scalar tail too
    want = F.silu(gu[:, :1539]) * gu[:, 1539:]
    got = ops.silu_mul(gu)
    if dt == torch.bfloat16:
        assert (got != want).sum().item() <= 2
    else:  # another exponential than torch's: a few ulp
        assert ((got - want).abs() <= want.abs() * 2.0 ** (3 - bits) + 1e-30).all()


def test_rope_equals_torch_in_place(kind):
    ops, dt, _ = kind
    cfg = tiny_model_config(head_dim=64, num_heads=9, num_kv_heads=3)
    rope = RotaryEmbedding(cfg, 512, dt, torch.device("cpu"))
    T, nh, nkv, d = 5, 9, 3, 64
    qkv = rand(T, (nh + 2 * nkv) * d, seed=4, scale=2, dtype=dt)
    positions = torch.tensor([0, 1, 17, 300, 511])
    cos, sin = rope.tables(positions)
    want = rope.apply(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), cos, sin)
    v_before = qkv[:, (nh + nkv) * d :].clone()
    ops.rope_(qkv, nh + nkv, d, positions, rope.cos, rope.sin)
    assert torch.equal(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), want)
    assert torch.equal(qkv[:, (nh + nkv) * d :], v_before)  # v untouched


def test_ops_reject_bad_input(kind):
    ops, dt, _ = kind
    name = native.dtype_name(dt)
    with pytest.raises(ValueError, match=name):
        ops.add_rms_norm(torch.randn(2, 8).half(), None, torch.randn(8).half(), 1e-5)
    with pytest.raises(ValueError, match=name):
        ops.silu_mul(torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="shapes"):
        ops.add_rms_norm(rand(2, 8, seed=0, dtype=dt), rand(2, 4, seed=0, dtype=dt),
                         rand(8, seed=0, dtype=dt), 1e-5)
    with pytest.raises(ValueError, match="positions"):
        ops.rope_(rand(2, 64, seed=0, dtype=dt), 1, 64, torch.tensor([0, 1], dtype=torch.int32),
                  rand(8, 64, seed=0, dtype=dt), rand(8, 64, seed=0, dtype=dt))


def test_engine_with_ops_matches_engine_without(kind):
    """Whole engine in the ops' dtype: greedy tokens with the native ops equal the torch
    ops' (chunked prefill, several requests), and a position past the tables is refused."""
    ops, dt, _ = kind
    cfg = tiny_model_config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                            intermediate_size=256)
    prompts = [[(5 * i + 11 * j) % 120 + 3 for j in range(n)] for i, n in enumerate((3, 50, 90))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = []
    for native_ops in (True, False):
        eng = tiny_engine(cfg, dtype=native.dtype_name(dt), block_size=16,
                          max_num_batched_tokens=32, quantization="none")
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
