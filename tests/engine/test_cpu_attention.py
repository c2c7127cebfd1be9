"""The native CPU paged-decode kernels (bfloat16 cache: AVX512-BF16; float32 cache, and
float32 q over a bfloat16 or float8 cache: AVX2) against float64 attention, and the `cpu`
backend wired into the engine (decodes through the kernel, same tokens as `torch`)."""

from __future__ import annotations

import shutil

import pytest
import torch

from splitserve.engine.attention import build_metadata, get_backend
from splitserve.engine import native
from splitserve.engine.attention.cpu import CpuAttentionBackend
from splitserve.engine.attention.torch_ref import TorchAttentionBackend
from splitserve.engine.sampling_params import SamplingParams

from .factories import built_kernel, tiny_engine, tiny_model_config

kernel = native.load_paged_decode()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C compiler or no AVX512-BF16: "
                                  "the kernel is not used")

#: Each kernel: (loaded kernel or None, q's dtype, largest error against float64, how
#: much larger than the torch path's its mean error may be; the cache's dtype is the
#: kernel's KV_DTYPE). bfloat16: the output's rounding (2^-9 relative) and the bf16-rounded
#: scaled q bound the error; float32 q (over either cache, the reference reading the same
#: cached values): only summation order, ~1e-8 here, where either path may win by chance
#: (measured up to 1.10x).
KERNELS = {
    "bf16": (kernel, torch.bfloat16, 2e-2, 1.05),
    "f32": (native.load_paged_decode_f32(), torch.float32, 2e-6, 1.25),
    "f32-bf16kv": (native.load_paged_decode_f32_bf16kv(), torch.float32, 2e-6, 1.25),
    "f32-fp8kv": (native.load_paged_decode_f32_fp8kv(), torch.float32, 2e-6, 1.25),
    # bfloat16 q over a float8 cache: q widened exactly, float32 inside, the output rounded
    # to bfloat16 (the torch path rounds its scores and weights too: measured 0.6-0.9x its
    # mean error)
    "bf16-fp8kv": (native.load_paged_decode_bf16_fp8kv(), torch.bfloat16, 2e-2, 1.05),
}


@pytest.fixture(params=sorted(KERNELS))
def kind(request):
    """Each one built here: its KERNELS entry."""
    return built_kernel(KERNELS, request.param, "paged-decode kernel")


def paged_case(lens, nkv, g, d, bs, layers=3, seed=0, dtype=torch.bfloat16, kv_dtype=None):
    """A cache (kv_dtype, default dtype) with each request's blocks scattered, q (dtype),
    and its metadata."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + 3
    cache = torch.randn(total, layers, 2, bs, nkv, d, generator=gen).to(kv_dtype or dtype)
    order = (torch.randperm(total - 1, generator=gen) + 1).tolist()
    tables, i = [], 0
    for n in nblocks:
        tables.append(order[i : i + n])
        i += n
    q = torch.randn(len(lens), nkv * g, d, generator=gen).to(dtype)
    meta = build_metadata([1] * len(lens), [n - 1 for n in lens], tables, bs, torch.device("cpu"))
    return cache, q, meta


def reference(cache, q, meta, layer, nkv):
    """float64 attention of each request's one query over its cached tokens (HF's grouping:
    query head j of kv head h is h * g + j)."""
    outs = []
    for i in range(q.shape[0]):
        n = int(meta.decode_seq_lens[i])
        blocks = meta.decode_block_table[i]
        k = cache[blocks, layer, 0].reshape(-1, nkv, q.shape[2])[:n].double()
        v = cache[blocks, layer, 1].reshape(-1, nkv, q.shape[2])[:n].double()
        qi = q[i].double().view(nkv, -1, q.shape[2])
        p = (torch.einsum("hgd,lhd->hgl", qi, k) * q.shape[2] ** -0.5).softmax(-1)
        outs.append(torch.einsum("hgl,lhd->hgd", p, v).reshape(-1, q.shape[2]))
    return torch.stack(outs)


@pytest.mark.parametrize("nkv,g,d,bs", [
    (3, 3, 64, 16),  # SmolLM2-135M: the vector paths
    (3, 3, 64, 32),  # two runs of 16 scores a block
    (2, 4, 64, 8),
    (1, 1, 64, 16),
    (2, 8, 64, 16),  # a group too wide for the register-blocked V path
    (2, 2, 128, 16),  # head_dim 128: vector scores, generic V accumulation
    (2, 3, 48, 4),  # head_dim 48: the scalar paths
    (2, 3, 40, 8),  # head_dim 40: float32 vector scores, generic V accumulation
])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_float64_attention(kind, nkv, g, d, bs, threads):
    kern, dtype, tol, slack = kind
    lens = [1, bs, bs + 1, 5 * bs - 3, 37]
    cache, q, meta = paged_case(lens, nkv, g, d, bs, dtype=dtype, kv_dtype=kern.KV_DTYPE)
    for layer in (0, 2):
        got = kern(q, cache, layer, meta.decode_block_table, meta.decode_seq_lens, d ** -0.5,
                   threads)
        assert got.dtype == dtype
        want = reference(cache, q, meta, layer, nkv)
        assert (got.double() - want).abs().max().item() < tol
        # ... and about as close to float64 as the torch reference path, or closer.
        torch_be = TorchAttentionBackend()
        torch_be.begin_step(meta, cache, nkv * g, nkv, d)
        ref_path = torch_be._decode(q, cache, layer, meta, nkv)
        assert ((got.double() - want).abs().mean()
                <= (ref_path.double() - want).abs().mean() * slack)


@pytest.mark.parametrize("bs", [16, 32, 8])
def test_slots_past_the_sequence_are_never_used(kind, bs):
    """The last block's unused slots (stale or never written: here NaN) do not reach the
    output, though the 16-token (bf16) / 8-token (f32) score runs read their rows."""
    kern, dtype, tol, _ = kind
    lens = [1, 5, 17, 2 * bs + 3]
    cache, q, meta = paged_case(lens, 3, 3, 64, bs, dtype=dtype, kv_dtype=kern.KV_DTYPE)
    for i, n in enumerate(lens):
        last = meta.decode_block_table[i][(n - 1) // bs]
        cache[last, :, :, (n - 1) % bs + 1:] = float("nan")
    got = kern(q, cache, 1, meta.decode_block_table, meta.decode_seq_lens, 0.125, 1)
    assert torch.isfinite(got).all()
    assert (got.double() - reference(cache, q, meta, 1, 3)).abs().max().item() < tol


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("n", [1, 20, 16 * 7, 16 * 40 + 5])
def test_one_request_split_over_threads_matches_float64(kind, n, threads):
    """Fewer requests than threads: each request's blocks are cut into runs, one a thread,
    whose softmax states merge (runs with no blocks when there are fewer blocks than
    threads). Same answer as one thread, as close to float64."""
    kern, dtype, tol, _ = kind
    cache, q, meta = paged_case([n], nkv=3, g=3, d=64, bs=16, seed=n, dtype=dtype,
                                kv_dtype=kern.KV_DTYPE)
    want = reference(cache, q, meta, 1, 3)
    got = kern(q, cache, 1, meta.decode_block_table, meta.decode_seq_lens, 0.125, threads)
    assert (got.double() - want).abs().max().item() < tol
    one = kern(q, cache, 1, meta.decode_block_table, meta.decode_seq_lens, 0.125, 1)
    assert (got.double() - one.double()).abs().max().item() < tol


def test_kernel_reads_strided_queries(kind):
    """The model hands the backend q as a view of the rotated [T, q + k heads, d] tensor."""
    kern, dtype, _, _ = kind
    cache, q, meta = paged_case([20, 33], nkv=3, g=3, d=64, bs=16, dtype=dtype,
                                kv_dtype=kern.KV_DTYPE)
    qk = torch.cat([q, torch.randn(2, 3, 64).to(dtype)], dim=1)  # [D, 9 + 3, d]
    view = qk[:, :9]
    assert not view.is_contiguous()
    got = kern(view, cache, 1, meta.decode_block_table, meta.decode_seq_lens, 0.125)
    assert torch.equal(got, kern(q, cache, 1, meta.decode_block_table, meta.decode_seq_lens,
                                 0.125))


def test_kernel_rejects_bad_input(kind):
    kern, dtype, _, _ = kind
    cache, q, meta = paged_case([20, 33], nkv=3, g=3, d=64, bs=16, dtype=dtype,
                                kv_dtype=kern.KV_DTYPE)
    too_long = meta.decode_seq_lens.clone()
    too_long[1] = meta.decode_block_table.shape[1] * 16 + 1
    with pytest.raises(ValueError, match="outside its block table"):
        kern(q, cache, 0, meta.decode_block_table, too_long, 0.125)
    other = torch.float16  # neither kernel's
    with pytest.raises(ValueError, match=native.dtype_name(dtype)):
        kern(q.to(other), cache.to(other), 0, meta.decode_block_table, meta.decode_seq_lens,
             0.125)
    with pytest.raises(ValueError, match=native.dtype_name(dtype)):
        kern(q.to(other), cache, 0, meta.decode_block_table, meta.decode_seq_lens, 0.125)
    with pytest.raises(ValueError, match="layer"):
        kern(q, cache, 3, meta.decode_block_table, meta.decode_seq_lens, 0.125)
    with pytest.raises(ValueError, match="int64"):
        kern(q, cache, 0, meta.decode_block_table.int(), meta.decode_seq_lens, 0.125)


def test_write_kv_equals_the_indexed_copies(kind):
    """k and v rows (slices of a fused qkv row, as the model passes them) land where the
    torch backend's two indexed copies put them, and nothing else changes."""
    kernel, dtype, _, _ = kind
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(10, 4, 2, 16, 3, 64, generator=gen).to(kernel.KV_DTYPE)
    qkv = torch.randn(6, 9 * 64 + 2 * 3 * 64, generator=gen).to(dtype)
    k, v = qkv[:, 576:768].view(6, 3, 64), qkv[:, 768:].view(6, 3, 64)
    meta = build_metadata([1, 1, 4], [16, 40, 0], [[3, 7], [0, 9, 2], [5]], 16,
                          torch.device("cpu"))
    want = cache.clone()
    TorchAttentionBackend._write_cache(2, k, v, want, meta)
    CpuAttentionBackend(dtype)._write_cache(2, k, v, cache, meta)
    assert torch.equal(cache, want)
    # a narrower cache holds k and v rounded to its dtype (to nearest even, as torch rounds)
    assert torch.equal(cache[5, 2, 0, 3], k[5].to(kernel.KV_DTYPE))
    bad = meta.slot_block.clone()
    bad[-1] = 10
    with pytest.raises(IndexError, match="outside the cache"):
        kernel.write_kv(cache, 2, k, v, bad, meta.slot_offset)
    assert torch.equal(cache, want)  # nothing written
    with pytest.raises(ValueError, match=native.dtype_name(dtype)):
        kernel.write_kv(cache.half(), 2, k, v, meta.slot_block, meta.slot_offset)
    with pytest.raises(ValueError, match="int64"):
        kernel.write_kv(cache, 2, k, v, meta.slot_block.int(), meta.slot_offset)


def test_a_prepared_decode_step_writes_and_attends_as_the_checked_calls(kind):
    """A decodes-only step is validated once (`prepare`); each layer's one write and one
    attention then give exactly the cache and output of `write_kv` + the kernel's checked
    call, and a q, k or v of another layout is refused before anything is written."""
    kern, dtype, _, _ = kind
    cache, _, meta = paged_case([20, 33, 1], nkv=3, g=3, d=64, bs=16, layers=3, dtype=dtype,
                                kv_dtype=kern.KV_DTYPE)
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(3, 9 * 64 + 2 * 3 * 64, generator=gen).to(dtype)  # the model's views
    q, k, v = (qkv[:, :576].view(3, 9, 64), qkv[:, 576:768].view(3, 3, 64),
               qkv[:, 768:].view(3, 3, 64))
    want = cache.clone()
    step = kern.prepare(cache, meta.decode_block_table, meta.decode_seq_lens, 9, 64,
                        meta.slot_block, meta.slot_offset, 0.125, 2)
    for layer in (2, 0):
        kern.write_kv(want, layer, k, v, meta.slot_block, meta.slot_offset)
        ref = kern(q, want, layer, meta.decode_block_table, meta.decode_seq_lens, 0.125, 2)
        got = step.layer(layer, q, k, v)
        assert torch.equal(cache, want)
        assert torch.equal(got, ref)
    for bad in (q.contiguous()[:2], q.to(torch.float16)):
        with pytest.raises(ValueError, match="shaped as its step"):
            step.layer(1, bad, k, v)
    with pytest.raises(ValueError, match="shaped as its step"):
        step.layer(1, q, k[:, :2], v)
    with pytest.raises(ValueError, match="layer 3 outside"):
        step.layer(3, q, k, v)
    assert torch.equal(cache, want)  # refused calls wrote nothing
    with pytest.raises(ValueError, match="one per token"):
        kern.prepare(cache, meta.decode_block_table, meta.decode_seq_lens, 9, 64,
                     meta.slot_block[:2], meta.slot_offset, 0.125, 2)


def test_the_cpu_backend_prepares_decode_only_steps(kind):
    """A step of decodes only takes the prepared path; a step with a prefill chunk keeps the
    general one (the chunk's tokens are written too); both give the torch path's output."""
    kern, dtype, _, _ = kind
    backend = CpuAttentionBackend(dtype)
    gen = torch.Generator().manual_seed(3)
    for q_lens, starts in (([1, 1], [20, 5]), ([1, 4], [20, 0])):
        cache = torch.randn(12, 2, 2, 16, 3, 64, generator=gen).to(kern.KV_DTYPE)
        T = sum(q_lens)
        meta = build_metadata(q_lens, starts, [[3, 7], [5, 9]], 16, torch.device("cpu"))
        ref_meta = build_metadata(q_lens, starts, [[3, 7], [5, 9]], 16, torch.device("cpu"))
        qkv = torch.randn(T, 15 * 64, generator=gen).to(dtype)
        q, k, v = (qkv[:, :576].view(T, 9, 64), qkv[:, 576:768].view(T, 3, 64),
                   qkv[:, 768:].view(T, 3, 64))
        ref_cache = cache.clone()
        backend.begin_step(meta, cache, 9, 3, 64)
        assert isinstance(meta.backend_state, native.PreparedDecode) == (T == 2)
        got = backend.forward(1, q, k, v, cache, meta)
        torch_backend = TorchAttentionBackend()
        torch_backend.begin_step(ref_meta, ref_cache, 9, 3, 64)
        want = torch_backend.forward(1, q, k, v, ref_cache, ref_meta)
        assert torch.equal(cache, ref_cache)
        assert got.shape == want.shape == (T, 576)
        assert (got.double() - want.double()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_build_is_cached_and_keyed_by_source(tmp_path):
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    source = native.CSRC / "paged_decode.c"
    first = native.build(source, tmp_path, compiler)
    assert native.build(source, tmp_path, compiler) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    copy = tmp_path / "src"
    shutil.copytree(native.CSRC, copy)
    assert native.build(copy / "paged_decode.c", tmp_path, compiler) == first
    (copy / "bf16.h").write_text((copy / "bf16.h").read_text() + "\n/* another build */\n")
    assert native.build(copy / "paged_decode.c", tmp_path, compiler) != first  # headers count


def test_no_compiler_falls_back_to_torch(no_compiler):
    backend = CpuAttentionBackend()
    assert backend.kernels == {}
    assert "no C compiler" in no_compiler.text
    cache, q, meta = paged_case([9, 30], nkv=2, g=2, d=16, bs=4)
    backend.begin_step(meta, cache, 4, 2, 16)
    got = backend._decode(q, cache, 0, meta, 2)
    assert (got.double() - reference(cache, q, meta, 0, 2)).abs().max().item() < 2e-2


def test_auto_picks_cpu_backend_on_cpu():
    assert get_backend("auto", torch.device("cpu")).name == "cpu"
    assert get_backend("torch", torch.device("cpu")).name == "torch"


def test_cpu_backend_engine_matches_torch_backend(kind):
    """Whole engine in the kernel's dtype (and KV cache dtype), SmolLM2's head shape (3 kv
    heads, groups of 3, head_dim 64): greedy tokens through the kernel equal the torch
    backend's, chunked prefill and concurrent decodes of different lengths included; all
    blocks come back. bfloat16 q over a float8 cache computes in float32 where the torch
    path rounds its scores and weights to bfloat16, so a tiny random model's near-flat
    logits part on near-ties: there only each prompt's first token (the prefill kernel over
    the widened cache) must agree; its decodes are held to float64 above and its effect on
    SmolLM2 to near-ties in test_parity_smollm2.py."""
    dtype = native.dtype_name(kind[1])
    kv_dtype = native.dtype_name(kind[0].KV_DTYPE)
    kv_dtype = "fp8" if kv_dtype == "float8_e4m3fn" else kv_dtype  # the flag's name
    cfg = tiny_model_config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                            intermediate_size=256)
    prompts = [[(7 * i + 3 * j) % 120 + 3 for j in range(n)] for i, n in enumerate((5, 40, 77))]
    outs = {}
    for backend in ("torch", "cpu"):
        eng = tiny_engine(cfg, dtype=dtype, attention_backend=backend, block_size=16,
                          max_num_batched_tokens=32, quantization="none",
                          kv_cache_dtype=kv_dtype)
        assert eng.runner.attn.name == backend
        assert eng.runner.kv_cache.dtype == kind[0].KV_DTYPE
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        outs[backend] = eng.generate(prompts, params)
        assert eng.pool.num_free_blocks == eng.pool.num_blocks
    if kind[1] == torch.bfloat16 and kind[0].KV_DTYPE != torch.bfloat16:
        assert [o[0] for o in outs["cpu"]] == [o[0] for o in outs["torch"]]
    else:
        assert outs["cpu"] == outs["torch"]


def test_every_library_has_a_loader():
    assert ({load.library for load in native._LOADERS}
            == {src.stem for src in native.CSRC.glob("*.c")})


@pytest.mark.parametrize("load", native._LOADERS, ids=lambda load: load.probe)
def test_a_library_built_without_its_instructions_is_not_used(load):
    """Every kernel: a build whose probe says it lacks its fast paths' instructions
    (AVX512-BF16; AVX2 for the float32 ones) is not used (its scalar paths lose to torch's),
    and the loader answers what the probe of this build says."""
    class Scalar:  # what a build on a CPU without those instructions reports
        pass

    setattr(Scalar, f"splitserve_{load.probe}_available", staticmethod(lambda: 0))
    assert native._vectorized(Scalar(), load.probe, "them") is False
    assert native._vectorized(None, load.probe, "them") is False
    lib = native.load_library(load.library)
    if lib is not None:
        assert native._vectorized(lib, load.probe, "them") == (load() is not None)
