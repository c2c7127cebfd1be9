"""The native CPU paged-prefill kernels (bfloat16 cache: AVX512-BF16; float32 cache: AVX2)
against float64 attention, and the `cpu` backend's prefill chunks through them (same
outputs as the torch backend within rounding, same greedy tokens)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.attention import build_metadata
from splitserve.engine.attention.cpu import CpuAttentionBackend
from splitserve.engine.attention.torch_ref import TorchAttentionBackend
from splitserve.engine.sampling_params import SamplingParams

from .factories import built_kernel, tiny_engine, tiny_model_config

#: Each kernel: (loaded kernel or None, cache dtype, largest error against float64, how
#: much larger than the torch path's its mean error may be over a set of cases).
#: bfloat16: the output's rounding (2^-9 relative, outputs up to ~4) and bf16
#: probabilities bound the error; float32: summation order and the exponential only
#: (errors ~1e-7, where the torch path is a little closer: measured up to 1.15x its mean).
KERNELS = {
    "bf16": (native.load_paged_prefill(), torch.bfloat16, 2e-2, 1.02),
    "f32": (native.load_paged_prefill_f32(), torch.float32, 1e-5, 1.25),
}


@pytest.fixture(params=sorted(KERNELS))
def kind(request):
    """Each one built here: its KERNELS entry."""
    return built_kernel(KERNELS, request.param, "paged-prefill kernel")


def prefill_case(q_len, ctx, nkv, g, d, bs, layers=3, seed=0, dtype=torch.bfloat16):
    """A cache holding a request's ctx tokens in shuffled blocks (block 0 unused, and spare
    blocks around), q for its last q_len positions, and its block table."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = -(-ctx // bs)
    total = nblocks + 3
    cache = torch.randn(total, layers, 2, bs, nkv, d, generator=gen).to(dtype)
    table = torch.randperm(total - 1, generator=gen)[:nblocks] + 1
    q = torch.randn(q_len, nkv * g, d, generator=gen).to(dtype)
    return cache, q, table


def reference(cache, q, table, layer, ctx):
    """float64 causal attention of q (positions ctx - q_len ..) over the ctx cached tokens
    (HF's grouping: query head j of kv head h is h * g + j)."""
    q_len, nh, d = q.shape
    nkv = cache.shape[4]
    k = cache[table, layer, 0].reshape(-1, nkv, d)[:ctx].double()
    v = cache[table, layer, 1].reshape(-1, nkv, d)[:ctx].double()
    s = torch.einsum("qhgd,khd->hgqk", q.double().view(q_len, nkv, nh // nkv, d), k) * d ** -0.5
    pos = torch.arange(ctx - q_len, ctx)
    s.masked_fill_(torch.arange(ctx)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hgqk,khd->qhgd", s.softmax(-1), v).reshape(q_len, nh, d)


def torch_path(cache, q, table, layer, ctx):
    """The torch backend's prefill of the same chunk (SDPA in the cache's dtype)."""
    nkv, d = cache.shape[4], cache.shape[5]
    chunk = slice(ctx - q.shape[0], ctx)
    k = cache[table, layer, 0].reshape(-1, nkv, d)[chunk]
    v = cache[table, layer, 1].reshape(-1, nkv, d)[chunk]
    out = torch.empty_like(q)
    TorchAttentionBackend()._prefill(layer, q, k, v, cache, ctx, table, out)
    return out


def errors(got, cache, q, table, layer, ctx):
    """|got - float64| and |torch path - float64|, elementwise."""
    want = reference(cache, q, table, layer, ctx)
    ref = torch_path(cache, q, table, layer, ctx)
    return (got.double() - want).abs().flatten(), (ref.double() - want).abs().flatten()


def check_close(cases, tol=2e-2, slack=1.02):
    """cases: (got, cache, q, table, layer, ctx) tuples; tol, slack: as in KERNELS."""
    err, ref_err = (torch.cat(e) for e in zip(*(errors(*c) for c in cases)))
    assert err.max().item() < tol
    # ... and over these cases it is about as close to float64 as the torch path
    assert err.mean().item() <= ref_err.mean().item() * slack


# (query length, context length): whole prompts and chunks after earlier context, ragged
# (not multiples of the 16-to-48-row query tiles, the 128-key tiles or the blocks).
CHUNKS = [(1, 1), (37, 37), (300, 300), (50, 173), (3, 90), (1, 133), (130, 261)]


@pytest.mark.parametrize("nkv,g,d,bs", [
    (3, 3, 64, 16),  # SmolLM2-135M: groups of 3, 16-position query tiles (f32: 8)
    (2, 4, 64, 8),  # groups of 4: 4 row vectors (3 + 1)
    (1, 1, 64, 16),  # no grouping: 48-position query tiles
    (2, 2, 128, 16),  # head_dim 128 (two 64-column output blocks), 32-position tiles
    (1, 8, 64, 16),  # groups of 8: 3 + 3 + 2 row vectors
    (2, 3, 80, 4),  # head_dim 80: a 16-column output block after the 64
    (2, 2, 48, 4),  # head_dim 48: one 48-column output block
    (2, 2, 16, 4),  # head_dim 16 (the tiny test models'): one 16-column block
    (2, 3, 40, 4),  # head_dim 40: the bf16 scalar path; f32: 5 vectors of 8 columns
    (1, 2, 36, 4),  # head_dim 36: the scalar paths
])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_float64_attention(kind, nkv, g, d, bs, threads):
    kernel, dtype, tol, slack = kind
    cases = []
    for q_len, ctx in CHUNKS:
        cache, q, table = prefill_case(q_len, ctx, nkv, g, d, bs, seed=q_len + ctx, dtype=dtype)
        for layer in (0, 2):
            got = kernel(q, cache, layer, table, ctx, d ** -0.5, num_threads=threads)
            assert got.dtype == dtype
            cases.append((got, cache, q, table, layer, ctx))
    check_close(cases, tol, slack)


def test_kernel_is_deterministic_across_threads(kind):
    kernel, dtype, _, _ = kind
    cache, q, table = prefill_case(300, 400, 3, 3, 64, 16, dtype=dtype)
    one = kernel(q, cache, 1, table, 400, 0.125, num_threads=1)
    assert torch.equal(one, kernel(q, cache, 1, table, 400, 0.125, num_threads=2))


def test_kernel_reads_strided_queries_and_writes_only_its_rows(kind):
    """The model hands the backend q as a view of the [T, q + k + v heads, d] projection,
    and the backend passes the chunk's rows of its output."""
    kernel, dtype, _, _ = kind
    cache, q, table = prefill_case(40, 70, nkv=3, g=3, d=64, bs=16, dtype=dtype)
    qkv = torch.cat([q, torch.randn(40, 6, 64).to(dtype)], dim=1)
    view = qkv[:, :9]
    assert not view.is_contiguous()
    big = torch.full((50, 9, 64), 7.0, dtype=dtype)
    kernel(view, cache, 1, table, 70, 0.125, out=big[5:45])
    assert torch.equal(big[5:45], kernel(q, cache, 1, table, 70, 0.125))
    assert (big[:5] == 7).all() and (big[45:] == 7).all()


def test_kernel_rejects_bad_input(kind):
    kernel, dtype, _, _ = kind
    name = native.dtype_name(dtype)
    cache, q, table = prefill_case(20, 33, nkv=3, g=3, d=64, bs=16, dtype=dtype)  # 3 blocks
    with pytest.raises(ValueError, match="outside its block table"):
        kernel(q, cache, 0, table, 49, 0.125)
    with pytest.raises(ValueError, match="shorter than the chunk"):
        kernel(q, cache, 0, table, 19, 0.125)
    with pytest.raises(ValueError, match=name):
        kernel(q.half(), cache.half(), 0, table, 33, 0.125)
    with pytest.raises(ValueError, match=name):
        kernel(q, cache.half(), 0, table, 33, 0.125)
    with pytest.raises(ValueError, match="CPU tensors"):
        kernel(q.to("meta"), cache, 0, table, 33, 0.125)
    with pytest.raises(ValueError, match="layer 3"):
        kernel(q, cache, 3, table, 33, 0.125)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, cache, 0, table.int(), 33, 0.125)
    with pytest.raises(ValueError, match="kv heads"):
        kernel(q[:, :8], cache, 0, table, 33, 0.125)
    with pytest.raises(ValueError, match="contiguous heads"):
        kernel(q.transpose(0, 1).contiguous().transpose(0, 1), cache, 0, table, 33, 0.125)
    with pytest.raises(ValueError, match="rows shaped as q"):
        kernel(q, cache, 0, table, 33, 0.125, out=torch.empty(21, 9, 64, dtype=dtype))
    with pytest.raises(ValueError, match="rows shaped as q"):
        kernel(q, cache, 0, table, 33, 0.125, out=torch.empty(20, 9, 64, dtype=torch.float16))
    bad = table.clone()
    bad[2] = cache.shape[0]
    with pytest.raises(ValueError, match="block id is outside the cache"):
        kernel(q, cache, 0, bad, 33, 0.125)
    bad[2] = -1
    with pytest.raises(ValueError, match="block id is outside the cache"):
        kernel(q, cache, 0, bad, 33, 0.125)
    # a table entry past the context is never read, so never checked
    bad = torch.cat([table, torch.tensor([10 ** 9])])
    assert torch.equal(kernel(q, cache, 0, bad, 33, 0.125), kernel(q, cache, 0, table, 33, 0.125))


@pytest.mark.parametrize("march,name", [("x86-64-v3", "bf16"), ("x86-64", "f32")])
def test_scalar_build_without_the_instructions(tmp_path, monkeypatch, march, name):
    """What a CPU without AVX512-BF16 (bf16) or without AVX2 (f32) builds: it says so (and
    is not loaded), but its scalar path still computes the same attention."""
    compiler = native._compiler()
    if compiler is None or native.platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86-64")
    monkeypatch.setattr(native, "CFLAGS", ("-O2", f"-march={march}", "-fopenmp", "-shared",
                                           "-fPIC"))
    lib = ctypes.CDLL(str(native.build(native.CSRC / "paged_prefill.c", tmp_path, compiler)))
    probe = "paged_prefill" if name == "bf16" else "paged_prefill_f32"
    assert getattr(lib, f"splitserve_{probe}_available")() == 0
    assert native._vectorized(lib, probe) is False
    _, dtype, tol, slack = KERNELS[name]
    scalar = (native.PagedPrefillKernel if name == "bf16" else native.PagedPrefillKernelF32)(lib)
    cases = []
    for q_len, ctx in [(37, 37), (20, 61)]:
        cache, q, table = prefill_case(q_len, ctx, 3, 3, 64, 16, dtype=dtype)
        cases.append((scalar(q, cache, 1, table, ctx, 0.125, num_threads=2), cache, q, table, 1,
                      ctx))
    check_close(cases, tol, slack)


def test_no_compiler_falls_back_to_torch(no_compiler):
    backend = CpuAttentionBackend()
    assert backend.prefill_kernels == {}
    assert "no C compiler" in no_compiler.text
    cache, q, table = prefill_case(20, 45, nkv=2, g=2, d=16, bs=4)
    k, v = (cache[table, 0, i].reshape(-1, 2, 16)[25:45] for i in (0, 1))
    out = torch.empty_like(q)
    backend._prefill(0, q, k, v, cache, 45, table, out)
    assert (out.double() - reference(cache, q, table, 0, 45)).abs().max().item() < 2e-2


def step_case(dtype, seed=0):
    """One step of the cpu backend: two decodes, a whole 70-token prompt and a 45-token
    chunk after 100 cached tokens, SmolLM2's head shape, blocks shuffled."""
    nkv, g, d, bs = 3, 3, 64, 16
    gen = torch.Generator().manual_seed(seed)
    q_lens, starts = [1, 1, 70, 45], [20, 40, 0, 100]
    perm = (torch.randperm(40, generator=gen) + 1).tolist()
    tables, i = [], 0
    for q_len, start in zip(q_lens, starts):
        n = -(-(start + q_len) // bs)
        tables.append(perm[i : i + n])
        i += n
    cache = torch.randn(41, 2, 2, bs, nkv, d, generator=gen).to(dtype)
    T = sum(q_lens)
    q, k, v = (torch.randn(T, h, d, generator=gen).to(dtype) for h in (nkv * g, nkv, nkv))
    meta = build_metadata(q_lens, starts, tables, bs, torch.device("cpu"))
    return cache, q, k, v, meta


def test_cpu_backend_prefill_matches_torch_backend(kind, monkeypatch):
    kernel, dtype, tol, _ = kind
    calls = []
    backend = CpuAttentionBackend()
    monkeypatch.setitem(backend.prefill_kernels, dtype,
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    outs = {}
    for name, be in (("cpu", backend), ("torch", TorchAttentionBackend())):
        cache, q, k, v, meta = step_case(dtype)
        be.begin_step(meta, cache, 9, 3, 64)
        outs[name] = be.forward(1, q, k, v, cache, meta).double()
    assert len(calls) == 2  # both chunks, not the decodes
    assert (outs["cpu"] - outs["torch"]).abs().max().item() < tol
    assert (outs["cpu"] - outs["torch"]).abs().mean().item() < tol / 20


def test_engine_greedy_tokens_with_the_kernel_equal_torch_prefill(kind, monkeypatch):
    """Whole engine in the kernel's dtype, SmolLM2's head shape: greedy tokens with prefill
    chunks through the kernel equal those with torch's prefill (chunks of 32 after earlier
    context included); all blocks come back."""
    kernel, dtype, _, _ = kind
    cfg = tiny_model_config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                            intermediate_size=256)
    prompts = [[(7 * i + 3 * j) % 120 + 3 for j in range(n)] for i, n in enumerate((5, 90, 150))]
    calls = []
    outs = {}
    for use_kernel in (False, True):
        eng = tiny_engine(cfg, dtype=native.dtype_name(dtype), attention_backend="cpu",
                          block_size=16, max_num_batched_tokens=32, quantization="none")
        attn = eng.runner.attn
        assert dtype in attn.prefill_kernels
        if use_kernel:
            monkeypatch.setitem(attn.prefill_kernels, dtype,
                                lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
        else:
            monkeypatch.delitem(attn.prefill_kernels, dtype)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        outs[use_kernel] = eng.generate(prompts, params)
        assert eng.pool.num_free_blocks == eng.pool.num_blocks
    assert calls
    assert outs[True] == outs[False]


def test_float32_model_over_a_bfloat16_cache(monkeypatch):
    """`--kv-cache-dtype bfloat16` with a float32 model, one step of decodes, a whole prompt
    and a chunk after context: the cpu backend (decodes through the float32-q kernel over
    the bfloat16 cache, prefill chunks through the float32 kernel over their blocks widened)
    and the torch backend write the same bfloat16-rounded keys and values, read every one
    back from the cache (the chunk's own too), and both equal float64 attention over those
    cached values to float32 rounding."""
    prefill, decode = KERNELS["f32"][0], native.load_paged_decode_f32_bf16kv()
    if prefill is None or decode is None:
        pytest.skip("the float32 kernels are not built here")
    backend = CpuAttentionBackend(torch.float32)
    assert backend.kernels[torch.bfloat16] is decode
    calls = []
    monkeypatch.setitem(backend.prefill_kernels, torch.float32,
                        lambda *a, **kw: calls.append(1) or prefill(*a, **kw))
    outs, caches = {}, {}
    for name, be in (("cpu", backend), ("torch", TorchAttentionBackend())):
        cache, q, k, v, meta = step_case(torch.float32)
        cache = cache.to(torch.bfloat16)
        be.begin_step(meta, cache, 9, 3, 64)
        outs[name], caches[name] = be.forward(1, q, k, v, cache, meta), cache
    assert len(calls) == 2  # both chunks, not the decodes
    assert outs["cpu"].dtype == torch.float32
    assert torch.equal(caches["cpu"], caches["torch"])
    assert torch.equal(caches["cpu"][meta.slot_block, 1, 0, meta.slot_offset],
                       k.to(torch.bfloat16))
    start = 0
    for q_len, ctx, blocks in zip(meta.q_lens, meta.ctx_lens, meta.block_tables):
        table = torch.tensor(blocks[: -(-ctx // 16)])
        want = reference(caches["cpu"], q[start : start + q_len], table, 1, ctx)
        for name in ("cpu", "torch"):
            got = outs[name].view(-1, 9, 64)[start : start + q_len].double()
            assert (got - want).abs().max().item() < 1e-5, name
        start += q_len
