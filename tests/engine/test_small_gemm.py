"""The native bfloat16 small-GEMM kernel (engine/csrc/small_gemm.c) against float64, and
`Linear` using it."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.models.llama import Linear

gemm = native.load_small_gemm()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX512-BF16)")


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 8, 13, 40])
@pytest.mark.parametrize("n,k", [(64, 32), (200, 96), (960, 576)])  # 200: a partial last tile
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_matches_float64(m, n, k, threads):
    x, w, b = bf16(m, k, seed=m), bf16(n, k, seed=n) / k ** 0.5, bf16(n, seed=k)
    want = x.double() @ w.double().T + b.double()
    got = gemm(x, gemm.pack(w), n, b, threads)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # float32 accumulation; the one bf16 rounding of the output (2^-9 relative) dominates.
    err = (got.double() - want).abs() / want.abs().clamp_min(1.0)
    assert err.max().item() < 8e-3
    # no bias, and rows read with a stride (a slice of a wider tensor)
    wide = torch.cat([x, bf16(m, 10, seed=1)], dim=1)[:, :k]
    assert torch.equal(gemm(wide, gemm.pack(w), n), gemm(x.contiguous(), gemm.pack(w), n))


@needs_kernel
def test_gemm_equals_onednn_linear():
    """Same accumulation in float32 and one rounding: as oneDNN's bf16 linear, up to the
    summation order."""
    x, w = bf16(5, 576, seed=0), bf16(3072, 576, seed=1) / 24
    ours = gemm(x, gemm.pack(w), 3072).float()
    ref = torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16).float()
    assert (ours - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


@needs_kernel
def test_gemm_rejects_bad_input():
    w = gemm.pack(bf16(64, 32, seed=0))
    with pytest.raises(ValueError, match="even"):
        gemm.pack(bf16(64, 31, seed=0))
    with pytest.raises(ValueError, match="width"):
        gemm(bf16(2, 30, seed=0), w, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        gemm(torch.randn(2, 32), w, 64)


@needs_kernel
def test_linear_uses_the_kernel_in_bf16_only():
    w, b = bf16(96, 64, seed=3), bf16(96, seed=4)
    lin = Linear(w, b)
    assert lin.gemm is not None and lin.weight is None
    x = bf16(3, 64, seed=5)
    want = (x.double() @ w.double().T + b.double())
    assert ((lin(x).double() - want).abs() / want.abs().clamp_min(1.0)).max() < 8e-3
    lin32 = Linear(w.float(), b.float())
    assert lin32.gemm is None
    assert torch.allclose(lin32(x.float()), torch.nn.functional.linear(x.float(), w.float(), b.float()))
