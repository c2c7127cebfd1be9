"""flashinfer paged attention on CUDA (`pip install splitserve[gpu]`).

The cache stays ours: `[blocks, layers, 2, block_size, kv_heads, head_dim]`. One layer's K
and V are `[blocks, block_size, kv_heads, head_dim]` views with a page stride of the whole
block, flashinfer's "NHD" layout with strided pages. Per step, `begin_step` turns the step's
metadata into flashinfer's CSR page table (`paged_kv_layout`, pure torch, tested on CPU) and
plans once (the page table is built from host lists: no device read-back): the decode wrapper when every request decodes one token, else the prefill
wrapper over all requests (decodes are query length 1; causal masking aligns each query to
the end of its context). Each layer then writes its new K/V into the cache and runs.

No GPU was available where this was written: the page-table logic is tested against the
torch backend on CPU (`tests/engine/test_flashinfer_layout.py`); the kernels run only where
CUDA and flashinfer are installed.
"""

from __future__ import annotations

import torch

from .base import AttentionMetadata

#: flashinfer's recommended float workspace.
WORKSPACE_BYTES = 128 << 20


def paged_kv_layout(meta: AttentionMetadata, device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qo_indptr, kv_indptr, kv_indices, kv_last_page_len), int32 on `device`, for the step's
    requests in batch order (decodes, then prefill chunks): request i's queries are rows
    qo_indptr[i]:qo_indptr[i+1], its context the pages kv_indices[kv_indptr[i]:kv_indptr[i+1]],
    the last of them holding kv_last_page_len[i] tokens. Built from the metadata's host
    lists (no device read-back), then copied to `device` once each."""
    bs = meta.block_size
    num_pages = [-(-c // bs) for c in meta.ctx_lens]
    qo_indptr = [0]
    kv_indptr = [0]
    for q, n in zip(meta.q_lens, num_pages):
        qo_indptr.append(qo_indptr[-1] + q)
        kv_indptr.append(kv_indptr[-1] + n)
    kv_indices = [b for table, n in zip(meta.block_tables, num_pages) for b in table[:n]]
    last = [c - (n - 1) * bs for c, n in zip(meta.ctx_lens, num_pages)]
    pin = torch.device(device).type == "cuda"
    return tuple(
        torch.tensor(v, dtype=torch.int32, pin_memory=pin).to(device, non_blocking=pin)
        for v in (qo_indptr, kv_indptr, kv_indices, last)
    )


class FlashInferAttentionBackend:
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer  # noqa: F401 - fail here, at engine start, when it is missing

        self._flashinfer = flashinfer
        self._workspace: torch.Tensor | None = None
        self._decode = None
        self._prefill = None

    def _wrappers(self, device: torch.device):
        if self._workspace is None:
            fi = self._flashinfer
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self._decode = fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
            self._prefill = fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        return self._decode, self._prefill

    def begin_step(self, meta: AttentionMetadata, kv_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
        decode, prefill = self._wrappers(kv_cache.device)
        qo_indptr, kv_indptr, kv_indices, last = paged_kv_layout(meta, kv_cache.device)
        dtype = kv_cache.dtype
        if not meta.prefills:
            decode.plan(kv_indptr, kv_indices, last, num_heads, num_kv_heads, head_dim,
                        meta.block_size, q_data_type=dtype, kv_data_type=dtype)
            meta.backend_state = decode
        else:
            prefill.plan(qo_indptr, kv_indptr, kv_indices, last, num_heads, num_kv_heads,
                         head_dim, meta.block_size, causal=True, q_data_type=dtype,
                         kv_data_type=dtype)
            meta.backend_state = prefill

    def forward(self, layer, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T, nh, d = q.shape
        layer_cache = kv_cache[:, layer]  # [NB, 2, bs, nkv, d]
        layer_cache[meta.slot_block, 0, meta.slot_offset] = k
        layer_cache[meta.slot_block, 1, meta.slot_offset] = v
        out = meta.backend_state.run(q.contiguous(), (layer_cache[:, 0], layer_cache[:, 1]))
        return out.reshape(T, nh * d)
