"""Reference attention over the paged cache with torch SDPA; runs on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def begin_step(self, meta, kv_cache, num_heads, num_kv_heads, head_dim) -> None:
        return None

    def forward(self, layer, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T, nh, d = q.shape
        nkv = k.shape[1]
        layer_cache = kv_cache[:, layer]  # [NB, 2, bs, nkv, d] (a view)
        layer_cache[meta.slot_block, 0, meta.slot_offset] = k
        layer_cache[meta.slot_block, 1, meta.slot_offset] = v
        out = torch.empty(T, nh, d, dtype=q.dtype, device=q.device)
        bs = meta.block_size

        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], layer_cache, meta, nkv)

        # SDPA gets 4-D [1, heads, len, dim] inputs: with 3-D ones torch takes a path several
        # times slower on CPU (measured: 2,048-token causal prefill 740 ms vs 150 ms a layer).
        for q_start, q_len, ctx, table in meta.prefills:
            qi = q[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)  # [1, nh, q, d]
            if ctx == q_len:
                # No earlier context: attend over this chunk's own k/v, causally.
                ki = k[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)
                vi = v[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=nh != nkv)
            else:
                ki = layer_cache[table, 0].view(-1, nkv, d)[:ctx].transpose(0, 1).unsqueeze(0)
                vi = layer_cache[table, 1].view(-1, nkv, d)[:ctx].transpose(0, 1).unsqueeze(0)
                pos_q = torch.arange(ctx - q_len, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= pos_q[:, None]
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=nh != nkv)
            out[q_start : q_start + q_len] = o[0].transpose(0, 1)
        return out.reshape(T, nh * d)

    @staticmethod
    def _decode(q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata,
                nkv: int) -> torch.Tensor:
        """One query token per request, as two plain batched GEMMs over the gathered context.

        `index_select` gathers each request's blocks contiguous as [L * kv_heads, d] (several
        times faster than advanced indexing), and every query head is scored against every
        kv head so no permuting copy is needed; the diagonal (each query head's own kv head,
        HF's repeat_kv grouping) is kept, and the probabilities go back block-diagonally.
        The extra multiply-adds are by exact zeros. Measured on this CPU against batched
        matmuls over permuted copies: 1 request at 1k context 450 -> 200 us a layer,
        16 at 512 3.3 -> 1.0 ms.
        """
        D, nh, d = q.shape
        g = nh // nkv
        flat = meta.decode_block_table.reshape(-1)
        L = meta.decode_block_table.shape[1] * meta.block_size
        k = layer_cache[:, 0].index_select(0, flat).view(D, L * nkv, d)
        v = layer_cache[:, 1].index_select(0, flat).view(D, L * nkv, d)
        s = torch.bmm(q, k.transpose(1, 2))  # [D, nh, L * nkv]
        # [D, kv_head, g, L, kv_head] -> its own kv head -> [D, g, kv_head, L]
        s = s.view(D, nkv, g, L, nkv).diagonal(dim1=1, dim2=4).transpose(2, 3)
        s = torch.add(meta.decode_bias, s, alpha=d ** -0.5)  # float32
        p = s.softmax(dim=-1).to(q.dtype)
        wide = q.new_zeros(D, nkv, g, L, nkv)
        wide.diagonal(dim1=1, dim2=4).copy_(p.transpose(2, 3))
        return torch.bmm(wide.view(D, nh, L * nkv), v)
