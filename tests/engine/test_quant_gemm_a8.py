"""The w4a8 kernel (engine/csrc/quant_gemm_a8.c, AVX2, AVX512-VNNI where built with it):
Q4_1 weights against float32 (or bfloat16) inputs quantized to int8 per group of 32 inside
the call. Checked against a float64 model of the same arithmetic (tight: only float32
summation order differs), against the exact GEMM (loose: the inputs' rounding), the
bfloat16 entry against the float32 one, an AVX2-only build against this machine's, and the
`--quantization w4a8` setting's refusals. Its effect on the real model's tokens:
test_parity_smollm2.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.config import EngineConfig
from splitserve.engine.model_runner import check_w4a8, keep_quantized
from splitserve.engine.quant import GROUP, QuantLinear

from .test_quant_gemm import f32, random_q4, random_q8

gemm = native.load_quant_gemm_a8()
gemm_bf16 = native.load_quant_gemm_a8_bf16()
needs_kernel = pytest.mark.skipif(gemm is None, reason="kernel not built here (no compiler "
                                  "or no AVX2/FMA/F16C)")


def reference(x: torch.Tensor, w) -> torch.Tensor:
    """float64 model of the kernel: x per group of 32 → dx = max|x| / 127, qx = x / dx
    rounded half to even; output d * dx * sum(q qx) + m * dx * sum(qx)."""
    m_, k = x.shape
    xg = x.view(m_, k // GROUP, GROUP).double()
    amax = xg.abs().amax(-1)
    dx = (amax.float() / 127).double()  # the kernel divides in float32
    inv = torch.where(amax > 0, (127 / amax.float()).double(), torch.zeros_like(amax))
    qx = torch.round((xg.float() * inv.float()[..., None]).double())  # round half to even
    n = w.shape[0]
    q = w.q.view(n, k // GROUP, GROUP).double()
    dots = torch.einsum("mgk,ngk->mng", qx, q)
    return ((dots * w.d.double()[None] * dx[:, None]).sum(-1)
            + (qx.sum(-1) * dx) @ w.m.double().T)


@needs_kernel
@pytest.mark.parametrize("m,n,k,threads", [(1, 24, 64, 1), (1, 960, 576, 2), (3, 40, 96, 2),
                                           (13, 40, 608, 2), (33, 17, 64, 2),
                                           (70, 576, 1536, 2)])
def test_a8_gemm_matches_its_float64_model(m, n, k, threads):
    """Every row count (one, a few, an odd count taken two at a time, past the kernel's
    32-row chunk), odd tile counts, rows past the last full tile, a width past one unpacked
    chunk of 16 groups (608 = 19 groups)."""
    w = random_q4(n, k, seed=n + k)
    x = f32(m, k, seed=m)
    want = reference(x, w)
    got = gemm(x, gemm.pack(w), num_threads=threads)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_kernel
def test_a8_gemm_is_close_to_the_exact_gemm():
    """The inputs' rounding (at most half a step of 1/127 of the group's largest) moves the
    output by well under 1 % here, more than float32 rounding would."""
    w = random_q4(256, 576, seed=1)
    x = f32(8, 576, seed=2)
    exact = x.double() @ w.dequantize().double().T
    got = gemm(x, gemm.pack(w)).double()
    err = ((got - exact).norm() / exact.norm()).item()
    assert 1e-6 < err < 1e-2, err


@needs_kernel
def test_a8_gemm_bias_strided_rows_threads_and_zero_groups():
    w = random_q4(40, 128, seed=5)
    packed = gemm.pack(w)
    wide = torch.zeros(5, 200)
    wide[:, :128] = f32(5, 128, seed=6)
    wide[2, 32:64] = 0  # an all-zero group: dx = 0, no division by zero
    view = wide[:, :128]  # rows 200 apart
    bias = f32(40, seed=7)
    one = gemm(view, packed, bias, num_threads=1)
    assert torch.equal(one, gemm(view, packed, bias, num_threads=2))
    assert torch.isfinite(one).all()
    want = reference(view.contiguous(), w) + bias.double()
    assert ((one.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_kernel
def test_a8_gemm_prefill_sized_output_equals_the_same_rows_in_slices():
    """A prefill-sized call (256 rows or more, 4 MB of output or more) is written with
    streaming stores, its tile pairs handed out two at a time and its rows rounded on every
    thread; each row's arithmetic is that of a small call, so the bytes are equal."""
    w = random_q4(528, 64, seed=11)  # rows of 528 floats: 64-byte lines
    packed = gemm.pack(w)
    x = f32(2001, 64, seed=12)  # 2,001 x 528 outputs: over 1M; an odd last row
    whole = gemm(x, packed, num_threads=2)
    sliced = torch.cat([gemm(x[i:i + 41], packed, num_threads=2) for i in range(0, 2001, 41)])
    assert torch.equal(whole, sliced)
    want = reference(x[-3:], w)
    assert ((whole[-3:].double() - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("m,n,k,bias", [(1, 960, 576, False), (5, 40, 96, True),
                                        (33, 17, 608, True), (300, 528, 64, False)])
def test_bf16_entry_is_the_float32_one_rounded_once(m, n, k, bias):
    """bfloat16 x widens exactly, so the bfloat16 entry's outputs are the float32 entry's on
    x.float() (bias added in float32) rounded to nearest even, bit for bit: one row, odd
    tile counts, a partial last tile, a prefill-sized call (its dynamic schedule)."""
    w = random_q4(n, k, seed=n + k + 1)
    x = f32(m, k, seed=m + 1).to(torch.bfloat16)
    b = f32(n, seed=3).to(torch.bfloat16) if bias else None
    packed = gemm_bf16.pack(w)
    got = gemm_bf16(x, packed, b, num_threads=2)
    want = gemm(x.float(), packed, None if b is None else b.float(), num_threads=2)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16 rows"):
        gemm_bf16(x.float(), packed)


@needs_kernel
def test_avx2_build_equals_this_machines_build(tmp_path, monkeypatch):
    """Where the CPU has AVX512-VNNI the integer dot products are one VPDPBUSD per 4 inputs
    instead of VPMADDUBSW + VPADDW (int16 pair sums) + VPMADDWD: the same integers, so an
    AVX2-only build (x86-64-v3) gives the same bytes. Elsewhere both builds are AVX2."""
    compiler = native._compiler()
    if compiler is None or native.platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86-64")
    monkeypatch.setattr(native, "CFLAGS", ("-O3", "-march=x86-64-v3", "-fopenmp", "-shared",
                                           "-fPIC"))
    lib = ctypes.CDLL(str(native.build(native.CSRC / "quant_gemm_a8.c", tmp_path, compiler)))
    avx2 = native.QuantGemmA8(lib)
    w = random_q4(200, 608, seed=21)
    packed = gemm.pack(w)
    avx2_bf16 = native.QuantGemmA8BF16(lib)
    for m in (1, 3, 16, 41):  # one row, a few, blocks of 8 / pairs of rows, an odd last row
        x = f32(m, 608, seed=m + 20)
        assert torch.equal(avx2(x, packed, num_threads=2), gemm(x, packed, num_threads=2))
        # the AVX2 build's own rounding to bfloat16 (no VCVTNEPS2BF16) against this one's
        xb = x.to(torch.bfloat16)
        assert torch.equal(avx2_bf16(xb, packed, num_threads=2),
                           gemm_bf16(xb, packed, num_threads=2))


@needs_kernel
def test_a8_gemm_rejects_bad_input():
    w = random_q4(16, 64, seed=0)
    packed = gemm.pack(w)
    with pytest.raises(ValueError, match="rows of the packed weight's width"):
        gemm(f32(2, 32, seed=0), packed)
    with pytest.raises(ValueError, match="rows of the packed weight's width"):
        gemm(f32(2, 64, seed=0).double(), packed)
    with pytest.raises(ValueError, match="takes q4_1 weights, not q8_0"):
        gemm.pack(random_q8(16, 64, seed=0))
    assert gemm(torch.empty(0, 64), packed).shape == (0, 16)


@needs_kernel
def test_quant_linear_with_the_a8_kernel_takes_every_batch():
    """No dense copy, no crossover: a prefill-sized batch runs the kernel too."""
    w = random_q4(48, 64, seed=9)
    lin = QuantLinear(w, None, torch.float32, native=gemm)
    x = f32(300, 64, seed=3)
    assert lin.dense is None
    assert torch.equal(lin(x), gemm(x, lin.packed, num_threads=torch.get_num_threads()))


def test_w4a8_setting_refuses_what_it_cannot_run():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="w4a8 runs a float32 or bfloat16 model, not float16"):
        check_w4a8(cpu, torch.float16)
    with pytest.raises(ValueError, match="w4a8 runs on CPU only"):
        check_w4a8(torch.device("cuda"), None)
    if gemm is None:
        with pytest.raises(ValueError, match="needs its AVX2/FMA/F16C kernel"):
            check_w4a8(cpu, torch.float32)
    else:
        for dtype in ("float32", "bfloat16"):
            assert keep_quantized(EngineConfig(dtype=dtype, device="cpu", quantization="w4a8"))


@needs_kernel
def test_w4a8_refuses_a_checkpoint_without_q4_1_weights():
    """A dense checkpoint (random weights here) has nothing for the kernel: say so rather
    than run float32 silently."""
    from .factories import tiny_engine

    with pytest.raises(ValueError, match="w4a8 runs Q4_1 weights"):
        tiny_engine(quantization="w4a8")
