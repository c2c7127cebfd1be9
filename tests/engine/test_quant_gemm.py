"""The native Q4_1 / Q8_0 kernels (engine/csrc/quant_gemm.c in bfloat16, quant_gemm_f32.c
in float32) against float64 on the dequantized weights, and `QuantLinear` choosing the
bfloat16 one (the float32 one: test_quant_gemm_f32.py)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native, quant
from splitserve.engine.quant import (NATIVE_F32_MAX_ROWS, NATIVE_MAX_ROWS, Q4_1Weight, Q8_0Weight,
                                     QuantLinear)

gemm = native.load_quant_gemm()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX512-BF16)")


def random_q4(rows: int, cols: int, seed: int) -> Q4_1Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-3
    m = -8 * d + torch.randn(rows, cols // 32, generator=g) * 0.01
    return Q4_1Weight(q, d.half().float(), m.half().float())  # fp16 values, as in a file


def random_q8(rows: int, cols: int, seed: int) -> Q8_0Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8)
    d = torch.rand(rows, cols // 32, generator=g) * 0.002 + 1e-4
    return Q8_0Weight(q, d.half().float())


RANDOM = {"q4_1": random_q4, "q8_0": random_q8}


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / want.abs().clamp_min(0.05)).max().item()


def f32(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error over the largest output: float32 sums of exact products."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


#: Each kernel: (loaded kernel or None, activations, their dtype, error measure, bound).
#: bfloat16: exact products, float32 sums, one bf16 rounding of the output (2^-9 relative).
KERNELS = {
    "bf16": (gemm, bf16, torch.bfloat16, rel_err, 8e-3),
    "f32": (native.load_quant_gemm_f32(), f32, torch.float32, max_rel_err, 1e-5),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 13, 20, 33])  # 33: past the f32 kernel's 32-row chunk
@pytest.mark.parametrize("n,k", [(8, 32), (16, 32), (200, 64), (203, 96), (960, 576), (576, 1536)])
# 200, 203: partial and odd counts of both kernels' tiles (16 and 8 outputs)
@pytest.mark.parametrize("threads", [1, 2])
def test_quant_gemm_matches_float64(kernel, fmt, m, n, k, threads):
    kern, acts, dtype, err, bound = KERNELS[kernel]
    if kern is None:
        pytest.skip(f"{kernel} kernel not built here (no compiler or not this CPU's instructions)")
    w, x, b = RANDOM[fmt](n, k, seed=n + k), acts(m, k, seed=m), acts(n, seed=k)
    want = x.double() @ w.dequantize().double().T + b.double()
    got = kern(x, kern.pack(w), b, threads)
    assert got.shape == (m, n) and got.dtype == dtype
    assert err(got, want) < bound
    # without bias, and rows read with a stride (a slice of a wider tensor)
    wide = torch.cat([x, acts(m, 32, seed=1)], dim=1)[:, :k]
    assert torch.equal(kern(wide, kern.pack(w), None, threads),
                       kern(x.contiguous(), kern.pack(w), None, threads))


@needs_kernel
def test_q4_gemm_uses_every_nibble_scale_and_minimum():
    """One weight, one scale or one minimum changed changes exactly its output."""
    w = random_q4(32, 64, seed=3)
    x = bf16(1, 64, seed=4)
    base = gemm(x, gemm.pack(w)).double()
    for row, col in [(0, 0), (17, 63), (31, 33), (5, 2)]:
        changed = []
        for part, edit in (("q", lambda t: t.__setitem__((row, col), (int(t[row, col]) + 7) % 16)),
                           ("d", lambda t: t.__setitem__((row, col // 32), t[row, col // 32] * 2)),
                           ("m", lambda t: t.__setitem__((row, col // 32), t[row, col // 32] + 0.5))):
            w2 = Q4_1Weight(w.q.clone(), w.d.clone(), w.m.clone())
            edit(getattr(w2, part))
            out = gemm(x, gemm.pack(w2)).double()
            want = x.double() @ w2.dequantize().double().T
            assert rel_err(out, want) < 8e-3, part
            changed.append(((out - base).abs() > 0).nonzero()[:, 1].tolist())
        assert all(c == [row] for c in changed), (row, col, changed)


@needs_kernel
def test_q8_gemm_reads_every_byte_with_its_sign():
    """Every int8 value (both nibbles, the high one signed) in every position."""
    q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).repeat(16, 2)  # [16, 512]
    q = q[torch.arange(16)[:, None], (torch.arange(512)[None, :] * 7 + torch.arange(16)[:, None]) % 512]
    w = Q8_0Weight(q.contiguous(), torch.full((16, 16), 0.5))
    x = bf16(3, 512, seed=11)
    want = x.double() @ w.dequantize().double().T
    assert rel_err(gemm(x, gemm.pack(w)), want) < 8e-3
    one_hot = torch.zeros(1, 512, dtype=torch.bfloat16)
    for col in (0, 1, 2, 3, 37, 511):
        one_hot.zero_()
        one_hot[0, col] = 1
        assert torch.equal(gemm(one_hot, gemm.pack(w))[0].float(), 0.5 * q[:, col].float())


def _kernel(name: str):
    kern = KERNELS[name][0]
    if kern is None:
        pytest.skip(f"{name} kernel not built here (no compiler or not this CPU's instructions)")
    return KERNELS[name]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_quant_gemm_rejects_bad_input(kernel):
    kern, acts, dtype, _, _ = _kernel(kernel)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    w = kern.pack(random_q4(32, 64, seed=0))
    with pytest.raises(ValueError, match="multiple of 32"):
        kern.pack(random_q4(32, 64, seed=0).map_rows(lambda t: t[:, : t.shape[1] // 2 + 1]))
    with pytest.raises(ValueError, match="width"):
        kern(acts(2, 96, seed=0), w)
    with pytest.raises(ValueError, match=str(dtype).replace("torch.", "")):
        kern(acts(2, 64, seed=0).to(other), w)
    with pytest.raises(ValueError, match="bias"):
        kern(acts(2, 64, seed=0), w, acts(32, seed=0).to(other))
    with pytest.raises(ValueError, match="bias"):
        kern(acts(2, 64, seed=0), w, acts(31, seed=0))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_quant_linear_runs_the_kernel_up_to_its_crossover(kernel, fmt):
    kern, acts, dtype, err, bound = _kernel(kernel)
    w, b = RANDOM[fmt](96, 128, seed=5), acts(96, seed=6)
    calls = []

    def dense(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 96, dtype=x.dtype)

    rows = (NATIVE_MAX_ROWS if dtype == torch.bfloat16 else NATIVE_F32_MAX_ROWS)[fmt]
    lin = QuantLinear(w, b, dtype, dense)
    assert type(lin.native) is type(kern) and lin.max_rows == rows
    x = acts(rows, 128, seed=7)
    want = x.double() @ w.dequantize().double().T + b.double()
    assert err(lin(x), want) < bound and calls == []
    lin(acts(rows + 1, 128, seed=8))
    assert calls == [rows + 1]


@pytest.mark.skipif(not quant.int4_kernel_available(), reason="no int4 CPU kernel in torch")
def test_quant_linear_without_the_kernel_uses_torchs(monkeypatch):
    monkeypatch.setattr(quant, "load_quant_gemm", lambda: None)
    w = random_q4(64, 64, seed=9)
    lin = QuantLinear(w, None, torch.bfloat16)
    assert lin.native is None and lin.max_rows == quant.INT4_MAX_ROWS
    x = bf16(2, 64, seed=10)
    y = lin(x).float()
    ref = x.float() @ w.dequantize().T
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999
    # Q8_0 has no torch kernel: not supported, and refused if asked
    q8 = random_q8(64, 64, seed=12)
    assert not QuantLinear.supported(q8.FORMAT, torch.bfloat16)
    with pytest.raises(ValueError, match="q8_0"):
        QuantLinear(q8, None, torch.bfloat16)
