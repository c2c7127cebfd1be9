"""flashinfer paged attention on CUDA (`pip install splitserve[gpu]`).

The cache stays ours: `[blocks, layers, 2, block_size, kv_heads, head_dim]`. One layer's K
and V are `[blocks, block_size, kv_heads, head_dim]` views with a page stride of the whole
block, flashinfer's "NHD" layout with strided pages. Per step, `begin_step` turns the step's
metadata into flashinfer's CSR page table (`paged_kv_layout`, pure torch, tested on CPU) and
plans once: the decode wrapper when every request decodes one token, else the prefill
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


def paged_kv_layout(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qo_indptr, kv_indptr, kv_indices, kv_last_page_len), int32, for the step's requests
    in batch order (decodes, then prefill chunks): request i's queries are rows
    qo_indptr[i]:qo_indptr[i+1], its context the pages kv_indices[kv_indptr[i]:kv_indptr[i+1]],
    the last of them holding kv_last_page_len[i] tokens."""
    bs = meta.block_size
    q_lens: list[int] = []
    ctx_lens: list[int] = []
    tables: list[torch.Tensor] = []
    if meta.num_decodes:
        seq_lens = meta.decode_seq_lens.tolist()
        for row, n in zip(meta.decode_block_table, seq_lens):
            q_lens.append(1)
            ctx_lens.append(n)
            tables.append(row[: -(-n // bs)])
    for _, q_len, ctx, table in meta.prefills:
        q_lens.append(q_len)
        ctx_lens.append(ctx)
        tables.append(table[: -(-ctx // bs)])
    dev = tables[0].device if tables else torch.device("cpu")
    qo_indptr = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qo_indptr[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    pages = torch.tensor([len(t) for t in tables], dtype=torch.int32)
    kv_indptr = torch.zeros(len(tables) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(pages, 0)
    kv_indices = (torch.cat(tables).to(torch.int32) if tables
                  else torch.zeros(0, dtype=torch.int32))
    last = torch.tensor([c - (p - 1) * bs for c, p in zip(ctx_lens, pages.tolist())],
                        dtype=torch.int32)
    return qo_indptr.to(dev), kv_indptr.to(dev), kv_indices.to(dev), last.to(dev)


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
        qo_indptr, kv_indptr, kv_indices, last = paged_kv_layout(meta)
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
