"""engine/quant.py: GGUF Q4_1 weights kept 4-bit and run with a 4-bit CPU kernel (torch's
int4 kernel here; the native one has tests/engine/test_q4_gemm.py).

The 4-bit weights must be exactly the file's numbers (checked against gguf's own
dequantizer and against the dense state dict on the default model), the kernel must compute
with them (float32 scales: equal to the dense GEMM up to rounding), and an engine loaded
with them must behave like the dense one.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from splitserve.engine.config import EngineConfig  # noqa: E402
from splitserve.engine.model_runner import keep_quantized  # noqa: E402
from splitserve.engine import quant  # noqa: E402
from splitserve.engine.quant import (  # noqa: E402
    INT4_MAX_ROWS,
    Q4_1Weight,
    Q8_0Weight,
    QuantLinear,
    int4_kernel_available,
)

needs_kernel = pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel in torch")


def _random_q4(rows: int, cols: int, seed: int = 0) -> Q4_1Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = torch.rand(rows, cols // 32, generator=g) * 0.02
    m = -8 * d + torch.randn(rows, cols // 32, generator=g) * 0.01
    # fp16-representable, as in a GGUF file
    return Q4_1Weight(q, d.half().float(), m.half().float())


def test_parse_equals_gguf_dequantize():
    """Bytes laid out as ggml writes Q4_1 parse back to the same numbers gguf computes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q4_1)
    ours = Q4_1Weight.from_gguf_blocks(raw, 6, 64)
    assert ours.q.max() <= 15 and ours.shape == (6, 64)
    np.testing.assert_array_equal(ours.dequantize().numpy(), dequantize(raw, GGMLQuantizationType.Q4_1))


def test_q8_0_parse_equals_gguf_dequantize():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q8_0)
    ours = Q8_0Weight.from_gguf_blocks(raw, 5, 96)
    assert ours.q.dtype == torch.int8 and ours.shape == (5, 96)
    np.testing.assert_array_equal(ours.dequantize().numpy(), dequantize(raw, GGMLQuantizationType.Q8_0))
    flipped = ours.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), ours.dequantize().flip(0))


def test_parse_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4_1Weight.from_gguf_blocks(np.zeros((2, 20), np.uint8), 2, 16)


def test_cat_and_map_rows_keep_rows_together():
    a, b = _random_q4(4, 64, 1), _random_q4(2, 64, 2)
    both = Q4_1Weight.cat([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    flipped = both.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), both.dequantize().flip(0))


@needs_kernel
@pytest.mark.parametrize("rows_in", [1, 3, INT4_MAX_ROWS])
def test_int4_linear_float32_matches_dense(rows_in):
    w = _random_q4(96, 128)
    bias = torch.randn(96)
    x = torch.randn(rows_in, 128)
    lin = QuantLinear(w, bias, torch.float32)  # no dense fallback: always the int4 kernel
    ref = x @ w.dequantize().T + bias
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_int4_linear_bfloat16_close_to_dense():
    w = _random_q4(192, 256)
    x = torch.randn(2, 256)
    y = QuantLinear(w, None, torch.bfloat16)(x.bfloat16()).float()
    ref = x @ w.dequantize().T
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999


@needs_kernel
def test_large_batches_take_the_dense_path(monkeypatch):
    monkeypatch.setattr(quant, "load_quant_gemm_f32", lambda: None)  # torch's int4 kernel
    w = _random_q4(32, 64)
    calls = []

    def dense(x):
        calls.append(x.shape[0])
        return x @ w.dequantize().T

    lin = QuantLinear(w, None, torch.float32, dense)
    lin(torch.randn(INT4_MAX_ROWS, 64))
    assert calls == []
    lin(torch.randn(INT4_MAX_ROWS + 1, 64))
    assert calls == [INT4_MAX_ROWS + 1]


def test_quantization_setting():
    from splitserve.engine.native import load_quant_gemm, load_quant_gemm_f32

    # float32: only our kernel (torch's int4 one loses to dense there)
    assert keep_quantized(EngineConfig(dtype="float32", device="cpu")) == (
        load_quant_gemm_f32() is not None)
    assert not keep_quantized(EngineConfig(dtype="bfloat16", device="cpu", quantization="none"))

    assert keep_quantized(EngineConfig(dtype="bfloat16", device="cpu")) == (
        int4_kernel_available() or load_quant_gemm() is not None)
    with pytest.raises(ValueError, match="quantization must be"):
        EngineConfig(quantization="gptq")


# ------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_source():
    from splitserve.engine.model_loader import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - the model package is an install step
        pytest.skip(f"default model not installed: {e}")


@needs_kernel
def test_default_model_q4_weights_equal_dense_state_dict(default_source):
    """Kept quantized (and un-permuted) they dequantize to exactly the dense weights."""
    from splitserve.engine.model_loader import load_state_dict

    dense = load_state_dict(default_source, torch.float32, progress=False)
    q4 = load_state_dict(default_source, torch.float32, progress=False, keep_quantized=True)
    kept = [n for n, w in q4.items() if isinstance(w, Q4_1Weight)]
    assert "model.layers.0.self_attn.q_proj.weight" in kept and len(kept) == 7 * 30
    for name in kept:
        assert torch.equal(q4[name].dequantize(), dense[name]), name
    embed = q4["model.embed_tokens.weight"]  # the file's one Q8_0 tensor
    assert isinstance(embed, Q8_0Weight)
    assert torch.equal(embed.dequantize(), dense["model.embed_tokens.weight"])


@needs_kernel
def test_q4_engine_generates_like_dense(default_source, smollm2_tokenizer):
    """bfloat16 engines on the 4-bit and on the dense weights: same greedy text start."""
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams

    prompt = smollm2_tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = {}
    for quant in ("q4_1", "none"):
        eng = Engine(EngineConfig(dtype="bfloat16", device="cpu", quantization=quant,
                                  num_kv_blocks=64, progress=False))
        assert eng.runner.model.weight_format == ("quantized" if quant == "q4_1" else "dense")
        outs[quant] = eng.generate([prompt], params)[0]
        assert eng.pool.num_free_blocks == eng.pool.num_blocks
    assert outs["q4_1"][:3] == outs["none"][:3]
