"""GGUF Q4_1 (and Q8_0) weights kept quantized for small-batch decode on CPU.

A Q4_1 block holds 32 consecutive weights of one row: an fp16 scale `d`, an fp16 minimum
`m` and 32 4-bit values `q`, with w = d*q + m. Small-batch decode is bound by reading
weights, so reading the 4.5 bits a weight the file stores beats reading 16 (or 32). Three
kernels:

- in bfloat16, the native kernel (engine/csrc/quant_gemm.c, AVX512-BF16), which takes the
  file's numbers as they are; it also runs Q8_0 (w = d*q, q an int8: SmolLM2's embedding,
  which its tied lm_head reads every step);
- in float32, its AVX2 counterpart (engine/csrc/quant_gemm_f32.c), Q4_1 and Q8_0 alike;
- otherwise (no compiler, or a CPU without the native kernel's instructions) torch's int4
  weight-only kernel (`aten._weight_int4pack_mm_for_cpu`), which computes
  w = (q - 8)*scale + zero per group of 32, so scale = d and zero = m + 8d.

This is for speed, not memory: a dense copy is kept too, for the larger steps where the
quantized kernels lose (`QuantLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from .native import (fn_address, load_quant_gemm, load_quant_gemm_a8, load_quant_gemm_a8_bf16,
                     load_quant_gemm_f32)

#: Weights per block, in both formats (ggml's QK4_1 and QK8_0).
GROUP = 32
#: Q4_1 bytes per block: d, m, 16 bytes of nibbles.
Q4_1_BLOCK_BYTES = 20


#: Q8_0: 32 weights a block, an fp16 scale then 32 int8s.
Q8_0_BLOCK_BYTES = 34


class _RowBlocks:
    """What the block formats share: q is [rows, cols], every field is [rows, ...]."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @staticmethod
    def _blocks(raw: np.ndarray, rows: int, cols: int, block_bytes: int,
                fmt: str) -> tuple[np.ndarray, np.ndarray]:
        """ggml's bytes as [rows, cols / 32, block_bytes] uint8 blocks, and their leading
        fp16 scales d as float32 [rows, cols / 32]."""
        if cols % GROUP:
            raise ValueError(f"{fmt} rows must be a multiple of {GROUP} long, got {cols}")
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // GROUP,
                                                                   block_bytes)
        return blocks, blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)

    def map_rows(self, fn):
        """Apply a row reordering (e.g. the q/k un-permutation) to every part alike."""
        return type(self)(*(fn(getattr(self, f.name)).contiguous() for f in fields(self)))

    @classmethod
    def cat(cls, parts: list):
        """Stack along rows (fused q/k/v or gate/up projections)."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class Q4_1Weight(_RowBlocks):
    """A [rows, cols] Q4_1 matrix: q uint8 [rows, cols] in 0..15, d and m float32
    [rows, cols // 32]."""

    FORMAT = "q4_1"
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, rows: int, cols: int) -> "Q4_1Weight":
        """Parse ggml's Q4_1 bytes (a GGUF tensor's data, [rows, cols / 32 * 20] uint8)."""
        blocks, d = cls._blocks(raw, rows, cols, Q4_1_BLOCK_BYTES, "Q4_1")
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        # Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
        return cls(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], computed as ggml does (d * q + m)."""
        rows, cols = self.shape
        q = self.q.view(rows, cols // GROUP, GROUP).float()
        return (self.d[..., None] * q + self.m[..., None]).reshape(rows, cols)


@dataclass
class Q8_0Weight(_RowBlocks):
    """A [rows, cols] Q8_0 matrix: q int8 [rows, cols], d float32 [rows, cols // 32];
    w = d * q."""

    FORMAT = "q8_0"
    q: torch.Tensor
    d: torch.Tensor

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, rows: int, cols: int) -> "Q8_0Weight":
        """Parse ggml's Q8_0 bytes ([rows, cols / 32 * 34] uint8)."""
        blocks, d = cls._blocks(raw, rows, cols, Q8_0_BLOCK_BYTES, "Q8_0")
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return cls(torch.from_numpy(q), torch.from_numpy(d))

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], as ggml computes it (d * q)."""
        rows, cols = self.shape
        q = self.q.view(rows, cols // GROUP, GROUP).float()
        return (self.d[..., None] * q).reshape(rows, cols)


def int4_kernel_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


#: Up to this many rows (tokens in the step) torch's int4 kernel beats the dense bf16 GEMM on
#: this CPU: its cost grows with the rows, the dense one's barely. Measured as whole decode
#: steps of SmolLM2 (1 thread, against the native small-GEMM kernel): 1 row 15.2 vs 17.3 ms,
#: 3 rows 21.1 vs 22.5, 4 rows 23.0 vs 21.8.
INT4_MAX_ROWS = 3

#: The same crossover for the native kernel. SmolLM2's 30 layers of projections (1 thread,
#: weights in DRAM), Q4_1 kernel vs small-GEMM: 1 row 3.6 vs 10.1 ms, 4 rows 7.0 vs 9.5,
#: 8 rows 11.7 vs 13.5, 16 rows 22.5 vs 19.8 (torch's int4 kernel: 6.8 ms at 1 row).
#: Q8_0 turns each weight into two bfloat16 nibbles, so it loses sooner: lm_head (49,152 x
#: 576), Q8_0 vs small-GEMM, 1 thread: 1 row 1.29 vs 1.77 ms, 3 rows 1.72 vs 1.78, 4 rows
#: 2.7 vs 1.9; 2 threads: 1 row 0.92 vs 1.78.
NATIVE_MAX_ROWS = {"q4_1": 12, "q8_0": 3}

#: The float32 kernel (AVX2) against dense float32 (torch's GEMM), measured as every
#: projection of SmolLM2's 30 layers plus its Q8_0 lm_head, weights in DRAM, on an AMD EPYC
#: (Zen 3, AVX2 only, 2 threads): 1 row 9.5 vs 45 ms, 8 rows 23 vs 89, 16 rows 41 vs 111,
#: 32 rows 78 vs 151, 64 rows 165 vs 219. At prefill sizes torch's GEMM runs ~130-145
#: GFLOPS against the kernel's ~105 (weights in cache).
NATIVE_F32_MAX_ROWS = {"q4_1": 64, "q8_0": 64}


def native_kernel(dtype: torch.dtype | None):
    """The native quantized kernel for activations in `dtype` that runs here, or None."""
    if dtype == torch.bfloat16:
        return load_quant_gemm()
    if dtype == torch.float32:
        return load_quant_gemm_f32()
    return None


def a8_kernel(dtype: torch.dtype | None):
    """The w4a8 kernel (Q4_1 against int8-rounded inputs) for a model in `dtype` that runs
    here, or None."""
    loader = {torch.float32: load_quant_gemm_a8, torch.bfloat16: load_quant_gemm_a8_bf16}
    return loader[dtype]() if dtype in loader else None


class QuantLinear:
    """y = x @ W.T (+ b) with W a Q4_1Weight or Q8_0Weight, on CPU: small batches (decode)
    through a quantized kernel, larger ones (prefill, big decode batches) through `dense`,
    the same weights dequantized. Activations and output are in `dtype`. In bfloat16 and
    float32 the native kernel for that dtype runs where it was built (exact fp16 scales,
    float32 sums); otherwise, for Q4_1, torch's int4 kernel, whose scales are in `dtype`.
    `supported` says whether any of them can run a weight."""

    __slots__ = ("packed", "scales_zeros", "bias", "out_features", "dense", "native", "max_rows")

    def __init__(self, w: Q4_1Weight | Q8_0Weight, bias: torch.Tensor | None,
                 dtype: torch.dtype, dense=None, native=None) -> None:
        """`native`: a kernel to use instead of the dtype's (the w4a8 kernel, which takes
        every batch: `dense` is then not needed)."""
        rows, _ = w.shape
        self.dense = dense
        self.bias = bias
        self.out_features = rows
        self.native = native or native_kernel(dtype)
        self.scales_zeros = None
        if self.native is not None:
            self.packed = self.native.pack(w)
            self.bias = None if bias is None else bias.contiguous()
            self.max_rows = (NATIVE_MAX_ROWS if dtype == torch.bfloat16
                             else NATIVE_F32_MAX_ROWS)[w.FORMAT]
            return
        if w.FORMAT != "q4_1" or not int4_kernel_available():
            raise ValueError(f"no CPU kernel here runs {w.FORMAT} weights in {dtype}")
        self.max_rows = INT4_MAX_ROWS
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 2)
        zero = w.m + 8.0 * w.d
        # [groups, rows, 2]: the kernel's layout.
        self.scales_zeros = torch.stack([w.d.t(), zero.t()], dim=-1).to(dtype).contiguous()

    def native_args(self) -> tuple | None:
        """(kernel entry address, packed weight, bias or None, N, K) for a caller that runs
        the native kernel itself (native.LayerStack), or None without one."""
        if self.native is None:
            return None
        fn = self.native._fns[self.packed.fmt]
        return (fn_address(fn), self.packed.data, self.bias, self.packed.n, self.packed.k)

    @property
    def rows_on_the_kernel(self) -> float:
        """The most rows a call runs on the native kernel (more take `dense`)."""
        return float("inf") if self.dense is None else self.max_rows

    @staticmethod
    def supported(fmt: str, dtype: torch.dtype | None) -> bool:
        """Whether a kernel here runs `fmt` ("q4_1" / "q8_0") weights in `dtype`."""
        if native_kernel(dtype) is not None:
            return True
        return fmt == "q4_1" and int4_kernel_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.max_rows:
            return self.dense(x)
        if self.native is not None:
            if x.stride(-1) != 1:
                x = x.contiguous()
            return self.native(x, self.packed, self.bias, torch.get_num_threads())
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP,
                                                      self.scales_zeros)
        return y if self.bias is None else y + self.bias
