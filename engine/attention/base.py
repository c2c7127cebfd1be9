"""The attention interface and the per-step metadata every backend reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the flattened batch and in the paged cache.

    Requests are ordered decodes first (one query token each), then prefill chunks.
    """

    num_tokens: int
    #: Cache slot of each token: block_id * block_size + offset.
    slot_block: torch.Tensor  # [T] long
    slot_offset: torch.Tensor  # [T] long
    block_size: int
    # Decodes (query length 1), batched together.
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [D, max_blocks] long, padded with 0
    decode_seq_lens: torch.Tensor | None  # [D] long
    # Prefill chunks: (query start in the flat batch, query length, context length incl.
    # this chunk, block table as a long tensor).
    prefills: list[tuple[int, int, int, torch.Tensor]]
    #: The same requests on the host, in batch order: query lengths, context lengths (incl.
    #: this step's tokens) and block tables (the scheduler's lists, not copied; a table may
    #: run past its context), so a backend can build page tables without reading device
    #: tensors back.
    q_lens: list[int] = field(default_factory=list)
    ctx_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    #: Backend-private state (e.g. flashinfer wrappers planned for this step).
    backend_state: object | None = None


def build_metadata(
    query_lens: list[int],
    starts: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Metadata for requests given decodes first: query lengths, start positions (tokens
    already in the cache) and block ids."""
    slot_block: list[int] = []
    slot_offset: list[int] = []
    for qlen, start, table in zip(query_lens, starts, block_tables):
        for p in range(start, start + qlen):
            slot_block.append(table[p // block_size])
            slot_offset.append(p % block_size)
    num_decodes = 0
    for q in query_lens:
        if q != 1:
            break
        num_decodes += 1
    dec_table = dec_lens = None
    if num_decodes:
        seq_lens = [starts[i] + 1 for i in range(num_decodes)]
        max_blocks = max(-(-s // block_size) for s in seq_lens)
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in block_tables[:num_decodes]]
        dec_table = torch.tensor(rows, dtype=torch.long, device=device)
        dec_lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    prefills = []
    q_start = num_decodes
    for i in range(num_decodes, len(query_lens)):
        ctx = starts[i] + query_lens[i]
        table = torch.tensor(block_tables[i][: -(-ctx // block_size)], dtype=torch.long, device=device)
        prefills.append((q_start, query_lens[i], ctx, table))
        q_start += query_lens[i]
    ctx_lens = [start + q for start, q in zip(starts, query_lens)]
    return AttentionMetadata(
        q_lens=query_lens,
        ctx_lens=ctx_lens,
        block_tables=block_tables,
        num_tokens=len(slot_block),
        slot_block=torch.tensor(slot_block, dtype=torch.long, device=device),
        slot_offset=torch.tensor(slot_offset, dtype=torch.long, device=device),
        block_size=block_size,
        num_decodes=num_decodes,
        decode_block_table=dec_table,
        decode_seq_lens=dec_lens,
        prefills=prefills,
    )


class AttentionBackend(Protocol):
    name: str

    def begin_step(self, meta: AttentionMetadata, kv_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
        """Prepare per-step state (plans, workspaces) once, before the layers run."""

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Write this step's k/v into the cache, then attend."""
