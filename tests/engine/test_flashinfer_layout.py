"""The flashinfer backend's page table (`paged_kv_layout`), checked on CPU.

Attention computed naively from the CSR page table must equal the torch backend's on the
same step: same pages, same lengths, causal alignment of each query to the end of its
context. The kernels themselves need CUDA (skipped here).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from splitserve.engine.attention import build_metadata, get_backend
from splitserve.engine.attention.flashinfer_backend import paged_kv_layout
from splitserve.engine.attention.torch_ref import TorchAttentionBackend

BS, NKV, NH, D, LAYERS, NB = 4, 2, 6, 8, 1, 40


def _step():
    """Two decodes (contexts 7 and 12) then a prefill chunk of 5 after 6 cached tokens and a
    fresh 3-token prompt."""
    q_lens = [1, 1, 5, 3]
    starts = [6, 11, 6, 0]
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(NB - 1, generator=gen).add(1).tolist()
    tables, i = [], 0
    for q, s in zip(q_lens, starts):
        n = -(-(q + s) // BS)
        tables.append(perm[i : i + n])
        i += n
    return q_lens, starts, tables


def _naive(q, kv_cache, layout, layer=0):
    qo_indptr, kv_indptr, kv_indices, last = (t.tolist() for t in layout)
    out = torch.empty_like(q)
    g = NH // NKV
    for r in range(len(qo_indptr) - 1):
        pages = kv_indices[kv_indptr[r] : kv_indptr[r + 1]]
        ctx = (len(pages) - 1) * BS + last[r]
        k = kv_cache[pages, layer, 0].reshape(-1, NKV, D)[:ctx]
        v = kv_cache[pages, layer, 1].reshape(-1, NKV, D)[:ctx]
        qs = q[qo_indptr[r] : qo_indptr[r + 1]]
        n = qs.shape[0]
        for h in range(NH):
            s = qs[:, h] @ k[:, h // g].T * D ** -0.5
            pos = torch.arange(ctx - n, ctx)[:, None]
            s = s.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
            out[qo_indptr[r] : qo_indptr[r + 1], h] = s.softmax(-1) @ v[:, h // g]
    return out


def test_layout_fields():
    q_lens, starts, tables = _step()
    meta = build_metadata(q_lens, starts, tables, BS, torch.device("cpu"))
    qo_indptr, kv_indptr, kv_indices, last = paged_kv_layout(meta)
    assert qo_indptr.tolist() == [0, 1, 2, 7, 10]
    assert kv_indptr.tolist() == [0, 2, 5, 8, 9]
    assert kv_indices.tolist() == [p for t in tables for p in t]
    assert last.tolist() == [3, 4, 3, 3]
    assert all(t.dtype == torch.int32 for t in (qo_indptr, kv_indptr, kv_indices, last))


@pytest.mark.parametrize("decode_only", [False, True])
def test_naive_attention_over_the_layout_equals_torch_backend(decode_only):
    q_lens, starts, tables = _step()
    if decode_only:
        q_lens, starts, tables = q_lens[:2], starts[:2], tables[:2]
    meta = build_metadata(q_lens, starts, tables, BS, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(NB, LAYERS, 2, BS, NKV, D, generator=gen, dtype=torch.float64)
    T = sum(q_lens)
    q = torch.randn(T, NH, D, generator=gen, dtype=torch.float64)
    k = torch.randn(T, NKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(T, NKV, D, generator=gen, dtype=torch.float64)
    torch_backend = TorchAttentionBackend()
    torch_backend.begin_step(meta, kv_cache, NH, NKV, D)
    ours = torch_backend.forward(0, q, k, v, kv_cache, meta).view(T, NH, D)
    # the torch backend wrote this step's k/v into the cache; the naive pass reads them back
    naive = _naive(q, kv_cache, paged_kv_layout(meta))
    torch.testing.assert_close(ours, naive)


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None,
                    reason="flashinfer is installed")
def test_flashinfer_backend_without_the_package_fails_at_start():
    with pytest.raises(ImportError):
        get_backend("flashinfer", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flashinfer") is None,
                    reason="needs CUDA and flashinfer")
@pytest.mark.parametrize("decode_only", [True, False])
def test_flashinfer_kernels_match_torch_backend_on_cuda(decode_only):
    q_lens, starts, tables = _step()
    if decode_only:
        q_lens, starts, tables = q_lens[:2], starts[:2], tables[:2]
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    T = sum(q_lens)
    # head_dim 64: the smallest flashinfer builds for
    d = 64
    kv_cache = torch.randn(NB, 2, 2, BS * 4, NKV, d, generator=gen).to(dev, torch.bfloat16)
    q, k, v = (torch.randn(T, n, d, generator=gen).to(dev, torch.bfloat16) for n in (NH, NKV, NKV))
    outs = []
    for backend in (TorchAttentionBackend(), get_backend("flashinfer", dev)):
        meta = build_metadata(q_lens, starts, tables, BS * 4, dev)
        cache = kv_cache.clone()
        backend.begin_step(meta, cache, NH, NKV, d)
        outs.append(backend.forward(1, q, k, v, cache, meta).float())
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
