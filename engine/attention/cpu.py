"""CPU attention: the torch backend with native kernels (`engine/native.py`) for a bfloat16
cache, and float32 versions of both for a float32 cache:

- decodes: the paged-decode kernel, which reads K and V straight from the paged cache (no
  gathered copy, V read once instead of once per query head) with blocks prefetched ahead.
  Measured on this project's 2-core CPU, one thread, one layer of SmolLM2's cache with
  every layer's blocks in memory (so the reads come from DRAM, as in a real step):
  4 requests at 2k context 1.25 → 0.69 ms, 32 at 1k 6.6 → 3.3 ms, 1 at 1k 0.24 → 0.09 ms
  (`tests/engine/test_cpu_attention.py` checks it against float64 attention); scoring 16
  tokens at a time (one accumulator each, summed by a transposing tree instead of one
  reduce a score) then took 32 at 1k from 4.5 to 3.4 ms on 1 thread and 2.6 to 1.7 ms on
  2 (the read bandwidth), 2 at 1.5k from 0.29 to 0.20 ms. With fewer
  requests than threads a request's blocks are split over the threads and the partial
  softmaxes merged (batch 1 on 2 threads: 2k context 0.27 → 0.13 ms, 640 0.068 → 0.051);
- prefill chunks: the paged-prefill kernel, flash-attention style over the paged cache
  (tiles of queries x the heads of one kv group against tiles of keys, AVX512-BF16 dot
  products, online softmax in float32, only the diagonal tiles masked). One layer of
  SmolLM2-135M (9 heads, 3 kv heads, head_dim 64), a whole prompt, torch SDPA → kernel,
  best of several runs on this CPU (Zen 4; shared, so ±10%):

      tokens   1 thread              2 threads
      512      8.8 → 2.0 ms (4.4x)   4.5 → 1.0 ms (4.4x)
      1,024    25 → 7.6 ms (3.3x)    15.5 → 4.1 ms (3.8x)
      2,048    85 → 29.5 ms (2.9x)   46 → 14.5 ms (3.2x)

  i.e. ~160 GFLOPS a thread where SDPA gets 35-60; a whole 1,024-token prefill of
  SmolLM2 in bfloat16 on 2 threads went 940 → 670 ms. The kernel is bound by the
  dot-product instruction (one 512-bit `vdpbf16ps` a cycle on Zen 4, ~70% of its time),
  then the exponentials (~13%) and packing. `tests/engine/test_cpu_prefill_attention.py`
  checks it against float64 attention and the torch path.

- float32 decodes (the float32 engine: parity tests, and `--dtype auto` on a CPU without
  bfloat16 units): the same kernel with AVX2 FMAs over a float32 cache, 8 tokens scored at
  a time. SmolLM2's cache, 30 layers a step, 2 threads, on an AVX2-only EPYC (Zen 3):
  1 request at 512 tokens 11.6 → 2.7 ms a step, at 2,048 40.5 → 7.2 ms; 16 at 600
  74 → 32 ms; 64 at 600 383 → 134 ms (~13 GB/s of the ~20 GB/s this VM reads);
- float32 decodes over a bfloat16 cache (a float32 model with `--kv-cache-dtype bfloat16`):
  the same float32 kernel reading each cached row widened from bfloat16 (a shift), half
  the bytes. SmolLM2's cache, 30 layers a step, random block ids, interleaved runs on that
  EPYC: 8 requests at 1,500 tokens 0.54x the float32 cache's time on 1 thread and
  0.50-0.57x on 2; 64 at 300 0.51-0.55x; 1 at 1,000 on 2 threads 0.66-0.75x. Its prefill
  chunks widen their blocks of the layer into a small float32 cache for the float32
  prefill kernel (the torch path, likewise, reads every key and value back from the
  cache). Over either narrow cache the scores take 4 tokens x a group's heads at a time
  (g <= 3), each K vector widened once for the group: 0.86-0.98x the time of widening it
  once a head;
- float32 decodes over a float8 e4m3 cache (`--kv-cache-dtype fp8`): the same kernel
  reading each row widened through the half-precision convert (F16C), a quarter of the
  float32 cache's bytes; its prefill chunks widen their blocks as the bfloat16 cache's do.
  Against the bfloat16 cache before the 4-token scores, interleaved in one process on that
  EPYC, two runs: 64 requests x 600 tokens 0.74-0.83x the time, 8 x 1,500 0.80-0.82x,
  1 x 576 0.85-0.92x. The kernel does not wait on the bytes alone (half of them bought
  ~20 %): the arithmetic and the scattered blocks' latency weigh as much.
- float32 prefill chunks: the paged-prefill kernel's float32 path (AVX2 + FMA, the same
  plan in 8-lane vectors): one layer of a SmolLM2 prompt on that EPYC against SDPA, 1 / 2
  threads, 512 tokens 1.7x / 2.3x, 1,024 1.3x / 1.2x, 2,048 1.2x / 1.3x.

This step's k and v go into the cache in one native call a layer too. Without a C compiler
or the instructions (AVX512-BF16 for a bfloat16 cache, AVX2 and FMA for float32), the
torch path runs.
"""

from __future__ import annotations

import torch

from .base import AttentionMetadata
from ..kv_dtype import FP8
from ..native import (PreparedDecode, load_paged_decode, load_paged_decode_f32,
                      load_paged_decode_bf16_fp8kv, load_paged_decode_f32_bf16kv,
                      load_paged_decode_f32_fp8kv,
                      load_paged_prefill, load_paged_prefill_f32)
from .torch_ref import TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        """dtype: the model's (q's); None: the cache's. A float32 model over a bfloat16 or
        float8 cache (`--kv-cache-dtype bfloat16 / fp8`) decodes with float32 q over it, a
        bfloat16 model over a float8 cache with bfloat16 q."""
        f32 = dtype == torch.float32
        decode = {torch.bfloat16: load_paged_decode_f32_bf16kv if f32 else load_paged_decode,
                  torch.float32: load_paged_decode_f32}
        if f32:
            decode[FP8] = load_paged_decode_f32_fp8kv
        elif dtype == torch.bfloat16:
            decode[FP8] = load_paged_decode_bf16_fp8kv
        #: The paged-decode kernel for each cache dtype it is built for here.
        self.kernels = _built(decode)
        #: The paged-prefill kernel likewise.
        self.prefill_kernels = _built({torch.bfloat16: load_paged_prefill,
                                       torch.float32: load_paged_prefill_f32})

    def begin_step(self, meta, kv_cache, num_heads, num_kv_heads, head_dim) -> None:
        """Native decodes: the step's cache, tables and lengths checked once here (not once a
        layer); otherwise the torch backend's preparation."""
        if not meta.num_decodes:
            return
        kernel = _kernel_for(self.kernels, kv_cache)
        if kernel is None:
            super().begin_step(meta, kv_cache, num_heads, num_kv_heads, head_dim)
            return
        if not meta.prefills:  # decodes only: each layer one prepared write and attention
            meta.backend_state = kernel.prepare(
                kv_cache, meta.decode_block_table, meta.decode_seq_lens, num_heads, head_dim,
                meta.slot_block, meta.slot_offset, head_dim ** -0.5, torch.get_num_threads())
            return
        kernel.check_step(kv_cache, meta.decode_block_table, meta.decode_seq_lens, num_heads,
                          head_dim)
        meta.backend_state = _NATIVE

    def forward(self, layer, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        state = meta.backend_state
        if isinstance(state, PreparedDecode):
            return state.layer(layer, q, k, v).view(q.shape[0], -1)
        return super().forward(layer, q, k, v, kv_cache, meta)

    def _write_cache(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                     kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """One native call for k and v (two indexed copies cost ~13 us of dispatch a layer,
        ~0.4 ms a decode step of SmolLM2)."""
        kernel = _kernel_for(self.kernels, kv_cache)
        if kernel is None:
            super()._write_cache(layer, k, v, kv_cache, meta)
            return
        kernel.write_kv(kv_cache, layer, k, v, meta.slot_block, meta.slot_offset)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                meta: AttentionMetadata, nkv: int) -> torch.Tensor:
        if meta.backend_state is not _NATIVE:
            return super()._decode(q, kv_cache, layer, meta, nkv)
        return self.kernels[kv_cache.dtype].run(q, kv_cache, layer, meta.decode_block_table,
                                                meta.decode_seq_lens, q.shape[-1] ** -0.5,
                                                torch.get_num_threads())

    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, ctx: int, table: torch.Tensor,
                 out: torch.Tensor) -> None:
        """A chunk over a cache narrower than q (`--kv-cache-dtype`): its context's blocks of
        this layer widened into a small cache of q's dtype, which q's kernel reads."""
        wide = kv_cache.dtype != q.dtype and kv_cache.device.type == "cpu"
        kernel = (self.prefill_kernels.get(q.dtype) if wide
                  else _kernel_for(self.prefill_kernels, kv_cache))
        if kernel is None:
            super()._prefill(layer, q, k, v, kv_cache, ctx, table, out)
            return
        if wide:  # [blocks, 1 layer, 2, block_size, kv_heads, head_dim]
            kv_cache = kv_cache[table, layer].to(q.dtype).unsqueeze(1)
            layer, table = 0, torch.arange(kv_cache.shape[0])
        kernel(q, kv_cache, layer, table, ctx, q.shape[-1] ** -0.5, out, torch.get_num_threads())


def _built(loaders: dict) -> dict:
    """dtype -> kernel, for each loader that finds its kernel built here."""
    return {dt: k for dt, load in loaders.items() if (k := load()) is not None}


def _kernel_for(kernels: dict, kv_cache: torch.Tensor):
    """The kernel of `kernels` for this cache (its dtype, in CPU memory), or None."""
    return kernels.get(kv_cache.dtype) if kv_cache.device.type == "cpu" else None


#: backend_state of a step whose decodes the kernel runs.
_NATIVE = "native-paged-decode"
