"""The float32 Q4_1 / Q8_0 kernel (engine/csrc/quant_gemm_f32.c, AVX2) against float64 on
the dequantized weights, and the float32 engine choosing it."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.config import EngineConfig
from splitserve.engine.model_runner import keep_quantized
from splitserve.engine.quant import NATIVE_F32_MAX_ROWS, Q4_1Weight, Q8_0Weight, QuantLinear

from .test_quant_gemm import RANDOM, random_q4

gemm = native.load_quant_gemm_f32()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX2/FMA/F16C)")


def f32(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error over the largest output: float32 sums of exact products."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 33])  # 33: past a 32-row chunk
@pytest.mark.parametrize("n,k", [(8, 32), (200, 64), (203, 96), (960, 576), (576, 1536)])
# 8 and 200: an odd number of tiles (the last one alone); 203: a partial tile
@pytest.mark.parametrize("threads", [1, 2])
def test_quant_gemm_f32_matches_float64(fmt, m, n, k, threads):
    w, x, b = RANDOM[fmt](n, k, seed=n + k), f32(m, k, seed=m), f32(n, seed=k)
    want = x.double() @ w.dequantize().double().T + b.double()
    got = gemm(x, gemm.pack(w), b, threads)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    # without bias, and rows read with a stride (a slice of a wider tensor)
    wide = torch.cat([x, f32(m, 32, seed=1)], dim=1)[:, :k]
    assert torch.equal(gemm(wide, gemm.pack(w), None, threads),
                       gemm(x.contiguous(), gemm.pack(w), None, threads))


@needs_kernel
def test_q4_f32_gemm_reads_each_weight_scale_and_minimum_where_it_belongs():
    """One-hot rows pick single inputs: output n is then exactly d * q + m of (n, input)."""
    w = random_q4(21, 64, seed=3)
    dense = w.dequantize()
    packed = gemm.pack(w)
    for col in (0, 1, 7, 8, 31, 32, 45, 63):
        x = torch.zeros(1, 64)
        x[0, col] = 1
        assert torch.equal(gemm(x, packed)[0], dense[:, col]), col


@needs_kernel
def test_q8_f32_gemm_reads_every_byte_with_its_sign():
    q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).repeat(16, 2)  # [16, 512]
    q = q[torch.arange(16)[:, None], (torch.arange(512)[None, :] * 7 + torch.arange(16)[:, None]) % 512]
    w = Q8_0Weight(q.contiguous(), torch.full((16, 16), 0.5))
    packed = gemm.pack(w)
    for col in (0, 1, 2, 3, 37, 511):
        x = torch.zeros(1, 512)
        x[0, col] = 1
        assert torch.equal(gemm(x, packed)[0], 0.5 * q[:, col].float())


@needs_kernel
def test_quant_gemm_f32_rejects_bad_input():
    w = gemm.pack(random_q4(32, 64, seed=0))
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm.pack(random_q4(32, 64, seed=0).map_rows(lambda t: t[:, : t.shape[1] // 2 + 1]))
    with pytest.raises(ValueError, match="width"):
        gemm(f32(2, 96, seed=0), w)
    with pytest.raises(ValueError, match="float32"):
        gemm(f32(2, 64, seed=0).bfloat16(), w)
    with pytest.raises(ValueError, match="bias"):
        gemm(f32(2, 64, seed=0), w, f32(31, seed=0))


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_quant_linear_runs_the_f32_kernel_up_to_its_crossover(fmt):
    w, b = RANDOM[fmt](96, 128, seed=5), f32(96, seed=6)
    calls = []

    def dense(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 96)

    rows = NATIVE_F32_MAX_ROWS[fmt]
    lin = QuantLinear(w, b, torch.float32, dense)
    assert isinstance(lin.native, native.QuantGemmF32) and lin.max_rows == rows
    x = f32(rows, 128, seed=7)
    want = x.double() @ w.dequantize().double().T + b.double()
    assert rel_err(lin(x), want) < 1e-5 and calls == []
    lin(f32(rows + 1, 128, seed=8))
    assert calls == [rows + 1]


def test_auto_keeps_weights_quantized_in_float32_only_with_the_kernel():
    cfg = EngineConfig(dtype="float32", device="cpu")
    assert keep_quantized(cfg) == (gemm is not None)
    assert not keep_quantized(EngineConfig(dtype="float32", device="cpu", quantization="none"))


def test_q4_1_weight_dequantizes_as_the_kernels_read_it():
    w = Q4_1Weight(torch.tensor([[3] * 32], dtype=torch.uint8), torch.tensor([[0.5]]),
                   torch.tensor([[-1.0]]))
    assert torch.equal(w.dequantize(), torch.full((1, 32), 0.5))
