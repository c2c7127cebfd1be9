"""The float32 Q4_1 / Q8_0 kernel (engine/csrc/quant_gemm_f32.c, AVX2): what it reads where,
and the float32 engine choosing it (its results against float64, its errors and
`QuantLinear`'s crossover: test_quant_gemm.py, with the bfloat16 kernel)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.config import EngineConfig
from splitserve.engine.model_runner import keep_quantized
from splitserve.engine.quant import Q4_1Weight, Q8_0Weight

from .test_quant_gemm import random_q4

gemm = native.load_quant_gemm_f32()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX2/FMA/F16C)")


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
def test_f32_gemm_streamed_output_equals_the_same_rows_in_slices():
    """A prefill-sized call (256 rows or more, 4 MB of output or more) is written with
    streaming stores, its tile pairs handed out two at a time: the same bytes as the same
    rows in small calls."""
    w = random_q4(4000, 32, seed=4)
    packed = gemm.pack(w)
    x = torch.randn(301, 32, generator=torch.Generator().manual_seed(5))
    whole = gemm(x, packed, num_threads=2)
    # slices of 32 rows: the kernel's row blocks (its summation order) as in the whole call
    sliced = torch.cat([gemm(x[i:i + 32], packed, num_threads=2) for i in range(0, 301, 32)])
    assert torch.equal(whole, sliced)
    assert torch.allclose(whole[:2].double(), x[:2].double() @ w.dequantize().double().T,
                          rtol=1e-5, atol=1e-4)


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


def test_auto_keeps_weights_quantized_in_float32_only_with_the_kernel():
    cfg = EngineConfig(dtype="float32", device="cpu")
    assert keep_quantized(cfg) == (gemm is not None)
    assert not keep_quantized(EngineConfig(dtype="float32", device="cpu", quantization="none"))


def test_q4_1_weight_dequantizes_as_the_kernels_read_it():
    w = Q4_1Weight(torch.tensor([[3] * 32], dtype=torch.uint8), torch.tensor([[0.5]]),
                   torch.tensor([[-1.0]]))
    assert torch.equal(w.dequantize(), torch.full((1, 32), 0.5))
