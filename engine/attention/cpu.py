"""CPU attention: the torch reference for prefill chunks, and for decodes on a bfloat16
cache the native paged-decode kernel (`engine/native.py`), which reads K and V straight from the
paged cache (no gathered copy, V read once instead of once per query head) with blocks
prefetched ahead.

Measured on this project's 2-core CPU, one thread, one layer of SmolLM2's cache with
every layer's blocks in memory (so the reads come from DRAM, as in a real step):
4 requests at 2k context 1.25 → 0.69 ms, 32 at 1k 6.6 → 3.3 ms, 1 at 1k 0.24 → 0.09 ms
(`tests/engine/test_cpu_attention.py` checks it against float64 attention). Without a C
compiler, or for a float32 cache (the parity tests' dtype), decodes take the torch path.
"""

from __future__ import annotations

import torch

from .base import AttentionMetadata
from ..native import load_paged_decode
from .torch_ref import TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self.kernel = load_paged_decode()

    def _native(self, kv_cache: torch.Tensor) -> bool:
        return (self.kernel is not None and kv_cache.dtype == torch.bfloat16
                and kv_cache.device.type == "cpu")

    def begin_step(self, meta, kv_cache, num_heads, num_kv_heads, head_dim) -> None:
        if not self._native(kv_cache):
            super().begin_step(meta, kv_cache, num_heads, num_kv_heads, head_dim)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                meta: AttentionMetadata, nkv: int) -> torch.Tensor:
        if not self._native(kv_cache):
            return super()._decode(q, kv_cache, layer, meta, nkv)
        return self.kernel(q, kv_cache, layer, meta.decode_block_table, meta.decode_seq_lens,
                           q.shape[-1] ** -0.5, torch.get_num_threads())
