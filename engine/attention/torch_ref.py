"""Reference attention over the paged cache with torch SDPA; runs on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv_dtype import to_cache_dtype
from .base import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def begin_step(self, meta, kv_cache, num_heads, num_kv_heads, head_dim) -> None:
        """For the decodes: the additive mask over the padded block tables, and the cache
        rows each (request, query head, position) reads V from, as one embedding-bag index
        list (see `_decode`)."""
        if not meta.num_decodes:
            return
        table = meta.decode_block_table  # [D, max_blocks]
        D, bs = table.shape[0], meta.block_size
        L = table.shape[1] * bs
        g = num_heads // num_kv_heads
        layers = kv_cache.shape[1]
        pos = torch.arange(L, device=table.device)
        # Row of (block b, token t, kv head h) in kv_cache.view(-1, head_dim), counted from
        # one layer's V of block 0: b * (rows a block spans) + t * kv_heads + h.
        row = table[:, pos // bs] * (layers * 2 * bs * num_kv_heads) + (pos % bs) * num_kv_heads
        heads = torch.arange(num_kv_heads, device=table.device)
        idx = row[:, None, None, :] + heads[None, None, :, None]  # [D, 1, nkv, L]
        # 0 on a request's tokens, -inf on its table's padding (float32)
        bias = torch.zeros(D, L, device=table.device)
        bias.masked_fill_(pos[None, :] >= meta.decode_seq_lens[:, None], float("-inf"))
        meta.backend_state = {
            "bias": bias.view(D, 1, 1, L),
            "pv_index": idx.expand(D, g, num_kv_heads, L).reshape(-1),
            "pv_offsets": torch.arange(0, D * num_heads * L, L, device=table.device),
        }

    def forward(self, layer, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T, nh, d = q.shape
        nkv = k.shape[1]
        self._write_cache(layer, k, v, kv_cache, meta)
        nd = meta.num_decodes
        dec = self._decode(q[:nd], kv_cache, layer, meta, nkv) if nd else None
        if not meta.prefills:
            return dec.reshape(T, nh * d)
        out = torch.empty(T, nh, d, dtype=q.dtype, device=q.device)
        if nd:
            out[:nd] = dec

        for q_start, q_len, ctx, table in meta.prefills:
            self._prefill(layer, q[q_start : q_start + q_len], k[q_start : q_start + q_len],
                          v[q_start : q_start + q_len], kv_cache, ctx, table,
                          out[q_start : q_start + q_len])
        return out.reshape(T, nh * d)

    @staticmethod
    def _write_cache(layer: int, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: AttentionMetadata) -> None:
        """This step's k and v [T, kv_heads, d] into their cache slots (rounded to the
        cache's dtype where it is narrower: `--kv-cache-dtype`)."""
        layer_cache = kv_cache[:, layer]  # [NB, 2, bs, nkv, d] (a view)
        layer_cache[meta.slot_block, 0, meta.slot_offset] = to_cache_dtype(k, kv_cache.dtype)
        layer_cache[meta.slot_block, 1, meta.slot_offset] = to_cache_dtype(v, kv_cache.dtype)

    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, ctx: int, table: torch.Tensor,
                 out: torch.Tensor) -> None:
        """One prefill chunk: q, k, v [q_len, heads, d] at positions ctx - q_len .. ctx - 1
        (their k/v already in the cache at `table`), causal attention written into out.
        Over a cache narrower than q (`--kv-cache-dtype`), every key and value is read back
        from the cache, the chunk's own included, so prefill and decode see the same ones."""
        q_len, nh, d = q.shape
        nkv = k.shape[1]
        # SDPA gets 4-D [1, heads, len, dim] inputs: with 3-D ones torch takes a path several
        # times slower on CPU (measured: 2,048-token causal prefill 740 ms vs 150 ms a layer).
        qi = q.transpose(0, 1).unsqueeze(0)  # [1, nh, q, d]
        if ctx == q_len and kv_cache.dtype == q.dtype:
            # No earlier context: attend over this chunk's own k/v, causally.
            ki = k.transpose(0, 1).unsqueeze(0)
            vi = v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=nh != nkv)
        else:
            layer_cache = kv_cache[:, layer]
            ki = layer_cache[:, 0].index_select(0, table).view(-1, nkv, d)[:ctx]
            vi = layer_cache[:, 1].index_select(0, table).view(-1, nkv, d)[:ctx]
            ki, vi = (x.to(q.dtype).transpose(0, 1).unsqueeze(0) for x in (ki, vi))
            pos_q = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= pos_q[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=nh != nkv)
        out.copy_(o[0].transpose(0, 1))

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                nkv: int) -> torch.Tensor:
        """One query token per request, without a kernel of its own:

        - scores: `index_select` gathers each request's K blocks contiguous as
          [L * kv_heads, d] (several times faster than advanced indexing) and one bmm scores
          every query head against every kv head (no permuting copy); the diagonal — each
          query head's own kv head, HF's repeat_kv grouping — is kept;
        - output: an embedding bag sums the probability-weighted V rows straight from the
          cache (rows from `begin_step`), so V is never gathered.

        Measured on this CPU against batched matmuls over permuted gathered copies (1
        thread): 1 request at 1k context 450 -> ~200 us a layer; 32 requests at 1k,
        V alone: 2.9 -> 1.1 ms.

        Over a cache narrower than q (`--kv-cache-dtype`) K and V are gathered and widened
        (the bag sums rows of the cache's dtype, and the weights must not be rounded to it).
        """
        D, nh, d = q.shape
        g = nh // nkv
        layer_cache = kv_cache[:, layer]
        flat = meta.decode_block_table.reshape(-1)
        L = meta.decode_block_table.shape[1] * meta.block_size
        k = layer_cache[:, 0].index_select(0, flat).view(D, L * nkv, d).to(q.dtype)
        s = torch.bmm(q, k.transpose(1, 2))  # [D, nh, L * nkv]
        # [D, kv_head, g, L, kv_head] -> its own kv head -> [D, g, kv_head, L]
        s = s.view(D, nkv, g, L, nkv).diagonal(dim1=1, dim2=4).transpose(2, 3)
        state = meta.backend_state
        s = torch.add(state["bias"], s, alpha=d ** -0.5)  # float32
        p = s.softmax(dim=-1).to(q.dtype)  # [D, g, kv_head, L]; padding gets exactly 0
        if kv_cache.dtype != q.dtype:
            v = layer_cache[:, 1].index_select(0, flat).view(D, L, nkv, d).to(q.dtype)
            return torch.einsum("bgkl,blkd->bkgd", p, v).reshape(D, nh, d)
        bs = meta.block_size
        rows = kv_cache.view(-1, d)[(layer * 2 + 1) * bs * nkv :]  # this layer's V, block 0 on
        o = F.embedding_bag(state["pv_index"], rows, state["pv_offsets"], mode="sum",
                            per_sample_weights=p.reshape(-1))
        return o.view(D, g, nkv, d).transpose(1, 2).reshape(D, nh, d)
