"""The native Q4_1 kernel (engine/csrc/q4_gemm.c) against float64 on the dequantized
weights, and `Int4Linear` choosing it."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native, quant
from splitserve.engine.quant import Q4_MAX_ROWS, Int4Linear, Q4_1Weight

gemm = native.load_q4_gemm()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX512-BF16)")


def random_q4(rows: int, cols: int, seed: int) -> Q4_1Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-3
    m = -8 * d + torch.randn(rows, cols // 32, generator=g) * 0.01
    return Q4_1Weight(q, d.half().float(), m.half().float())  # fp16 values, as in a file


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / want.abs().clamp_min(0.05)).max().item()


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 13, 20])
@pytest.mark.parametrize("n,k", [(16, 32), (200, 96), (960, 576), (576, 1536)])  # 200: a partial tile
@pytest.mark.parametrize("threads", [1, 2])
def test_q4_gemm_matches_float64(m, n, k, threads):
    w, x, b = random_q4(n, k, seed=n + k), bf16(m, k, seed=m), bf16(n, seed=k)
    want = x.double() @ w.dequantize().double().T + b.double()
    got = gemm(x, gemm.pack(w), n, b, threads)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # exact products, float32 sums, one bf16 rounding of the output (2^-9 relative)
    assert rel_err(got, want) < 8e-3
    # without bias, and rows read with a stride (a slice of a wider tensor)
    wide = torch.cat([x, bf16(m, 32, seed=1)], dim=1)[:, :k]
    assert torch.equal(gemm(wide, gemm.pack(w), n, None, threads),
                       gemm(x.contiguous(), gemm.pack(w), n, None, threads))


@needs_kernel
def test_q4_gemm_uses_every_nibble_scale_and_minimum():
    """One weight, one scale or one minimum changed changes exactly its output."""
    w = random_q4(32, 64, seed=3)
    x = bf16(1, 64, seed=4)
    base = gemm(x, gemm.pack(w), 32).double()
    for row, col in [(0, 0), (17, 63), (31, 33), (5, 2)]:
        changed = []
        for part, edit in (("q", lambda t: t.__setitem__((row, col), (int(t[row, col]) + 7) % 16)),
                           ("d", lambda t: t.__setitem__((row, col // 32), t[row, col // 32] * 2)),
                           ("m", lambda t: t.__setitem__((row, col // 32), t[row, col // 32] + 0.5))):
            w2 = Q4_1Weight(w.q.clone(), w.d.clone(), w.m.clone())
            edit(getattr(w2, part))
            out = gemm(x, gemm.pack(w2), 32).double()
            want = x.double() @ w2.dequantize().double().T
            assert rel_err(out, want) < 8e-3, part
            changed.append(((out - base).abs() > 0).nonzero()[:, 1].tolist())
        assert all(c == [row] for c in changed), (row, col, changed)


@needs_kernel
def test_q4_gemm_rejects_bad_input():
    w = gemm.pack(random_q4(32, 64, seed=0))
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm.pack(random_q4(32, 64, seed=0).map_rows(lambda t: t[:, : t.shape[1] // 2 + 1]))
    with pytest.raises(ValueError, match="width"):
        gemm(bf16(2, 96, seed=0), w, 32)
    with pytest.raises(ValueError, match="bfloat16"):
        gemm(torch.randn(2, 64), w, 32)
    with pytest.raises(ValueError, match="bias"):
        gemm(bf16(2, 64, seed=0), w, 32, torch.randn(32))


@needs_kernel
def test_int4_linear_runs_the_kernel_in_bf16_up_to_its_crossover():
    w, b = random_q4(96, 128, seed=5), bf16(96, seed=6)
    calls = []

    def dense(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 96, dtype=x.dtype)

    lin = Int4Linear(w, b, torch.bfloat16, dense)
    assert lin.q4 is gemm and lin.max_rows == Q4_MAX_ROWS
    x = bf16(Q4_MAX_ROWS, 128, seed=7)
    want = x.double() @ w.dequantize().double().T + b.double()
    assert rel_err(lin(x), want) < 8e-3 and calls == []
    lin(bf16(Q4_MAX_ROWS + 1, 128, seed=8))
    assert calls == [Q4_MAX_ROWS + 1]


@pytest.mark.skipif(not quant.int4_kernel_available(), reason="no int4 CPU kernel in torch")
def test_int4_linear_without_the_kernel_uses_torchs(monkeypatch):
    monkeypatch.setattr(quant, "load_q4_gemm", lambda: None)
    w = random_q4(64, 64, seed=9)
    lin = Int4Linear(w, None, torch.bfloat16)
    assert lin.q4 is None and lin.max_rows == quant.INT4_MAX_ROWS
    x = bf16(2, 64, seed=10)
    y = lin(x).float()
    ref = x.float() @ w.dequantize().T
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999
