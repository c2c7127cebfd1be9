"""The engine's CPU kernels in C (`csrc/`): built with the system C compiler on first use,
cached, loaded with ctypes.

- `paged_decode.c`: decode attention over the paged bfloat16 cache (`load_paged_decode`),
  and over a float32 cache on any AVX2 CPU (`load_paged_decode_f32`), float32 q over a
  bfloat16 cache there too (`load_paged_decode_f32_bf16kv`: `--kv-cache-dtype bfloat16`);
- `paged_prefill.c`: causal attention of a prefill chunk over the paged bfloat16 cache,
  flash-attention style (`load_paged_prefill`), and over a float32 cache on any AVX2 CPU
  (`load_paged_prefill_f32`);
- `small_gemm.c`: bfloat16 linear layers for few rows, on weights packed at load
  (`load_small_gemm`);
- `quant_gemm.c`: linear layers for few rows straight from GGUF Q4_1 / Q8_0 weights kept
  quantized (`load_quant_gemm`), and `quant_gemm_f32.c` the same for the float32 engine
  on any AVX2 CPU (`load_quant_gemm_f32`); `quant_gemm_a8.c` runs Q4_1 with the inputs
  quantized to int8 (`load_quant_gemm_a8`, `--quantization w4a8`; for a bfloat16 model
  `load_quant_gemm_a8_bf16`);
- `layer_ops.c`: a layer's elementwise steps in bfloat16 (residual add + RMSNorm, RoPE,
  SiLU-and-multiply), one call each (`load_layer_ops`), and in float32 on any AVX2 CPU
  (`load_layer_ops_f32`).

Lifecycle: loading a kernel hashes its source, the compiler flags and this CPU's model and
feature flags (`-march=native` code runs only where it was built), looks for
`~/.cache/splitserve/kernels/<name>-<hash>.so` (under `$XDG_CACHE_HOME` where set), and
otherwise compiles it there (to a temporary name, then renamed, so workers starting
together never load a half-written file). No compiler, a failed build or a failed load
gives None once, with a warning, and callers keep their torch path. The libraries are
plain C with OpenMP: no Python or torch headers, so any `cc` builds one in about a
second, and they join the OpenMP runtime torch has already loaded (same soname) instead of
starting a second thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_home import splitserve_cache
from .kv_dtype import FP8, to_cache_dtype

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILERS = ("cc", "gcc", "clang")


def _layer_ptr(kv_cache: torch.Tensor, layer: int) -> int:
    """Address of `layer`'s K in block 0 of a contiguous [blocks, layers, 2, ...] cache: the
    kernels' base pointer, from which block b sits b * stride(0) elements further."""
    return kv_cache.data_ptr() + layer * kv_cache.stride(1) * kv_cache.element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32": a dtype as `--dtype` and the kernels' errors name it."""
    return str(dtype).removeprefix("torch.")


class _OneDtype:
    """A kernel wrapper for one element type: DTYPE, and the SUFFIX its C entry points end
    in (subclasses swap both for the float32 build)."""

    DTYPE = torch.bfloat16
    SUFFIX = "bf16"

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.DTYPE)


def _check_decode_rc(rc: int) -> None:
    """Raise for a paged-decode call's return code."""
    if rc == -2:
        raise MemoryError("paged-decode kernel: out of memory for its scratch")
    if rc != 0:
        raise ValueError("paged-decode kernel: a sequence length is outside its block table")


class PagedDecodeKernel(_OneDtype):
    """Decode attention for bfloat16 caches laid out as the engine's
    [num_blocks, layers, 2, block_size, kv_heads, head_dim]. DTYPE is q's and out's type,
    KV_DTYPE the cache's (the same but in PagedDecodeKernelF32BF16KV)."""

    KV_DTYPE = torch.bfloat16

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = getattr(lib, f"splitserve_paged_decode_{self.SUFFIX}")
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, i64, ptr, i32, i32, i32, i32, i32,
                       ctypes.c_float, i32]
        fn.restype = i32
        self._fn = fn
        w = lib.splitserve_write_kv
        w.argtypes = [ptr, i64, i64, i64, i32, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i32]
        w.restype = i32
        self._write = w

    def check_step(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Validate what stays the same for every layer of a step (once a step: `run` does
        not check it). block_table [D, max_blocks] and seq_lens [D] int64 (tokens in the
        cache incl. this one)."""
        _, _, two, _, nkv, hd = kv_cache.shape
        if kv_cache.dtype != self.KV_DTYPE or hd != head_dim or two != 2:
            raise ValueError(f"the {self.dtype_name} paged-decode kernel takes a "
                             f"{dtype_name(self.KV_DTYPE)} cache of one head_dim")
        if not kv_cache.is_contiguous():
            raise ValueError("the paged-decode kernel takes a contiguous cache and q rows")
        if num_heads % nkv:
            raise ValueError(f"bad heads ({num_heads} over {nkv} kv heads)")
        for t in (block_table, seq_lens):
            if t.dtype != torch.int64 or not t.is_contiguous():
                raise ValueError("block_table and seq_lens must be contiguous int64")
        if seq_lens.shape != (block_table.shape[0],):
            raise ValueError("block_table and seq_lens need one row per request")

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
            block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
            num_threads: int = 1) -> torch.Tensor:
        """One layer, after `check_step` passed for this cache, table and lengths.
        q [D, heads, head_dim] in DTYPE (each request's heads contiguous) → [D, heads,
        head_dim]."""
        D, nh, d = q.shape
        if (q.dtype != self.DTYPE or q.stride(2) != 1 or q.stride(1) != d
                or block_table.shape[0] != D or not 0 <= layer < kv_cache.shape[1]):
            raise ValueError(f"the paged-decode kernel takes {self.dtype_name} q rows, one "
                             f"per table row, and a layer of the cache (got layer {layer})")
        out = torch.empty(D, nh, d, dtype=q.dtype)
        layer_k = _layer_ptr(kv_cache, layer)
        nkv = kv_cache.shape[4]
        rc = self._fn(q.data_ptr(), q.stride(0), out.data_ptr(), layer_k, kv_cache.stride(0),
                      kv_cache.stride(2), block_table.data_ptr(), block_table.shape[1],
                      seq_lens.data_ptr(), D, nkv, nh // nkv, d, kv_cache.shape[3], scale,
                      num_threads)
        _check_decode_rc(rc)
        return out

    def write_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_block: torch.Tensor, slot_offset: torch.Tensor) -> None:
        """kv_cache[slot_block[t], layer, 0 / 1, slot_offset[t]] = k[t] / v[t] for every token
        t: k, v [T, kv_heads, head_dim] in DTYPE with contiguous rows (rounded to KV_DTYPE
        first where that differs), slots int64 [T]."""
        T, nkv, d = k.shape
        _, layers, _, bs, cnkv, cd = kv_cache.shape
        if self.KV_DTYPE != self.DTYPE and k.dtype == self.DTYPE:
            k, v = to_cache_dtype(k, self.KV_DTYPE), to_cache_dtype(v, self.KV_DTYPE)
        if (kv_cache.dtype != self.KV_DTYPE or not kv_cache.is_contiguous()
                or not 0 <= layer < layers or (cnkv, cd) != (nkv, d) or v.shape != k.shape):
            raise ValueError(f"write_kv takes {self.dtype_name} k and v of the cache's heads")
        for t in (k, v):
            if t.dtype != self.KV_DTYPE or t.stride(2) != 1 or t.stride(1) != d:
                raise ValueError("write_kv takes k and v rows with contiguous heads")
        for t in (slot_block, slot_offset):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (T,):
                raise ValueError("write_kv takes contiguous int64 slots, one per token")
        layer_k = _layer_ptr(kv_cache, layer)
        rc = self._write(layer_k, kv_cache.stride(0), kv_cache.stride(2), kv_cache.shape[0], bs,
                         k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                         slot_block.data_ptr(), slot_offset.data_ptr(), T, nkv * d,
                         kv_cache.element_size())
        if rc != 0:
            raise IndexError("write_kv: a slot is outside the cache")

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_threads: int = 1) -> torch.Tensor:
        """`check_step` and `run` together: one layer, everything validated."""
        self.check_step(kv_cache, block_table, seq_lens, q.shape[1], q.shape[2])
        return self.run(q, kv_cache, layer, block_table, seq_lens, scale, num_threads)

    def prepare(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, num_heads: int, head_dim: int,
                slot_block: torch.Tensor, slot_offset: torch.Tensor, scale: float,
                num_threads: int) -> "PreparedDecode":
        """A step of decodes only (one token a request, slots in request order): what stays
        the same for its layers validated once, for `PreparedDecode.layer`."""
        self.check_step(kv_cache, block_table, seq_lens, num_heads, head_dim)
        D = block_table.shape[0]
        for t in (slot_block, slot_offset):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (D,):
                raise ValueError("write_kv takes contiguous int64 slots, one per token")
        return PreparedDecode(self, kv_cache, block_table, seq_lens, num_heads, slot_block,
                              slot_offset, scale, num_threads)


class PreparedDecode:
    """One decode step's calls, built once a step (a few µs of checks and argument packing
    a layer saved: ~30 µs of a SmolLM2 step's 30 layers each in the write and the attention,
    which at batch 1 is ~0.5 ms of a ~10 ms step). `layer` checks only what changes a layer:
    q's, k's and v's layout."""

    __slots__ = ("kernel", "cache", "base", "layer_bytes", "layers", "write_args", "run_args",
                 "d", "q_shape", "kv_shape", "round_kv")

    def __init__(self, kernel: PagedDecodeKernel, kv_cache, block_table, seq_lens, num_heads,
                 slot_block, slot_offset, scale, num_threads) -> None:
        D = block_table.shape[0]
        _, layers, _, bs, nkv, d = kv_cache.shape
        self.kernel = kernel
        self.cache = kv_cache  # kept alive with the pointers below
        self.base = kv_cache.data_ptr()
        self.layer_bytes = kv_cache.stride(1) * kv_cache.element_size()
        self.layers = layers
        self.d = d
        self.q_shape, self.kv_shape = (D, num_heads, d), (D, nkv, d)
        self.round_kv = kernel.KV_DTYPE != kernel.DTYPE
        self.write_args = (kv_cache.stride(0), kv_cache.stride(2), kv_cache.shape[0], bs,
                           slot_block.data_ptr(), slot_offset.data_ptr(), D, nkv * d,
                           kv_cache.element_size())
        self.run_args = (kv_cache.stride(0), kv_cache.stride(2), block_table.data_ptr(),
                         block_table.shape[1], seq_lens.data_ptr(), D, nkv, num_heads // nkv,
                         d, bs, scale, num_threads)

    def layer(self, layer: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        """Write this step's k and v [D, kv_heads, head_dim] into `layer` of the cache, then
        attend with q [D, heads, head_dim] (in the kernel's DTYPE, heads contiguous in each
        row) → [D, heads, head_dim]."""
        kern, dt, d = self.kernel, self.kernel.DTYPE, self.d
        for t, shape in ((q, self.q_shape), (k, self.kv_shape), (v, self.kv_shape)):
            if t.dtype != dt or t.shape != shape or t.stride(2) != 1 or t.stride(1) != d:
                raise ValueError(f"a prepared decode takes {kern.dtype_name} q, k and v rows "
                                 "with contiguous heads, shaped as its step")
        if not 0 <= layer < self.layers:
            raise ValueError(f"the paged-decode kernel: layer {layer} outside the cache")
        if self.round_kv:
            k, v = to_cache_dtype(k, kern.KV_DTYPE), to_cache_dtype(v, kern.KV_DTYPE)
        layer_k = self.base + layer * self.layer_bytes
        w = self.write_args
        if kern._write(layer_k, w[0], w[1], w[2], w[3], k.data_ptr(), k.stride(0),
                       v.data_ptr(), v.stride(0), w[4], w[5], w[6], w[7], w[8]) != 0:
            raise IndexError("write_kv: a slot is outside the cache")
        out = torch.empty(self.q_shape, dtype=dt)
        rc = kern._fn(q.data_ptr(), q.stride(0), out.data_ptr(), layer_k, *self.run_args)
        _check_decode_rc(rc)
        return out


class PagedDecodeKernelF32(PagedDecodeKernel):
    """The same for a float32 cache (AVX2 and FMA): the float32 engine's decodes, e.g. on a
    CPU without bfloat16 units, where `--dtype auto` is float32."""

    DTYPE = torch.float32
    KV_DTYPE = torch.float32
    SUFFIX = "f32"


class PagedDecodeKernelF32BF16KV(PagedDecodeKernel):
    """Float32 q over a bfloat16 cache (AVX2 and FMA): a float32 engine with
    `--kv-cache-dtype bfloat16`, whose decode steps then read half the bytes."""

    DTYPE = torch.float32
    KV_DTYPE = torch.bfloat16
    SUFFIX = "f32_bf16kv"


class PagedDecodeKernelF32FP8KV(PagedDecodeKernel):
    """Float32 q over a float8 e4m3 cache (AVX2, FMA and F16C): a float32 engine with
    `--kv-cache-dtype fp8`, a quarter of the float32 cache's bytes a step."""

    DTYPE = torch.float32
    KV_DTYPE = FP8
    SUFFIX = "f32_fp8kv"


class PagedDecodeKernelBF16FP8KV(PagedDecodeKernel):
    """Bfloat16 q and out over a float8 e4m3 cache: a bfloat16 engine with `--kv-cache-dtype
    fp8`, half the bfloat16 cache's bytes a step. The float32 kernel's float8 path (AVX2,
    FMA and F16C) on q widened exactly; k and v rounded from bfloat16 to float8 once."""

    DTYPE = torch.bfloat16
    KV_DTYPE = FP8
    SUFFIX = "bf16_fp8kv"


def fn_address(fn) -> int:
    """A ctypes function's address, for a kernel that calls other kernels (layer_stack.c)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _StackLinear(ctypes.Structure):
    _fields_ = [("fn", _ptr), ("w", _ptr), ("bias", _ptr), ("n", _i64), ("k", _i64)]


class _StackLayer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _StackLinear),
                ("o", _StackLinear), ("gate_up", _StackLinear), ("down", _StackLinear)]


class _Stack(ctypes.Structure):
    """csrc/layer_stack.c's struct stack, field for field."""

    _fields_ = [(n, _i64) for n in ("num_layers", "hidden", "nh", "nkv", "d", "inter")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", _ptr),
        ("final_norm", _ptr)] + [(n, _ptr) for n in (
            "add_rms_norm", "rope", "silu_mul", "write_kv", "decode", "cos", "sin")] + [
        ("T", _i64)] + [(n, _ptr) for n in (
            "h", "out", "positions", "x", "qkv", "attn", "delta", "gu", "act", "kvn",
            "cache")] + [(n, _i64) for n in (
                "layer_bytes", "block_stride", "v_off", "num_blocks", "bs", "kv_elem")] + [
        (n, _ptr) for n in ("slot_block", "slot_offset", "tables", "seq_lens")] + [
        ("max_blocks", _i64), ("threads", _i64)]


class LayerStack:
    """A float32 decode step's decoder layers in one native call (csrc/layer_stack.c), on the
    model's own kernels: `plan` once per model, `__call__` once a step."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.splitserve_layer_stack_f32
        fn.argtypes = [ctypes.POINTER(_Stack)]
        fn.restype = ctypes.c_int
        self._fn = fn

    @staticmethod
    def plan(layers: list[tuple], final_norm: torch.Tensor, ops: "LayerOps", cos: torch.Tensor,
             sin: torch.Tensor, shape: tuple[int, int, int, int, int], eps: float) -> dict:
        """layers: (input_norm, post_norm, qkv, o, gate_up, down) per layer, each projection
        as QuantLinear.native_args() gives it; shape: (hidden, heads, kv_heads, head_dim,
        intermediate). The returned plan keeps every tensor it points at alive."""
        if ops.DTYPE != torch.float32:
            raise ValueError("the layer stack runs the float32 layer ops")
        arr = (_StackLayer * len(layers))()
        keep = [final_norm, cos, sin]
        for i, (inorm, pnorm, *lins) in enumerate(layers):
            keep += [inorm, pnorm]
            arr[i].input_norm, arr[i].post_norm = inorm.data_ptr(), pnorm.data_ptr()
            for name, (fn, w, bias, n, k) in zip(("qkv", "o", "gate_up", "down"), lins):
                keep += [w, bias]
                setattr(arr[i], name, _StackLinear(fn, w.data_ptr(),
                                                   bias.data_ptr() if bias is not None else None,
                                                   n, k))
        hidden, nh, nkv, d, inter = shape
        st = _Stack(num_layers=len(layers), hidden=hidden, nh=nh, nkv=nkv, d=d, inter=inter,
                    eps=eps, layers=ctypes.addressof(arr), final_norm=final_norm.data_ptr(),
                    add_rms_norm=fn_address(ops._fns["add_rms_norm"]),
                    rope=fn_address(ops._fns["rope"]), silu_mul=fn_address(ops._fns["silu_mul"]),
                    cos=cos.data_ptr(), sin=sin.data_ptr())
        return {"stack": st, "layers": arr, "keep": keep}

    def __call__(self, plan: dict, h: torch.Tensor, positions: torch.Tensor,
                 decode: "PreparedDecode") -> torch.Tensor:
        """h [T, hidden] float32 contiguous (the embeddings; updated in place as the residual
        stream), positions [T] int64 inside the rotary tables, `decode` this step's prepared
        decodes (one token a request, T requests) → the final norm's output [T, hidden]."""
        st = plan["stack"]
        T, H = h.shape
        kern = decode.kernel
        if (h.dtype != torch.float32 or not h.is_contiguous() or H != st.hidden
                or kern.DTYPE != torch.float32 or decode.q_shape != (T, st.nh, st.d)
                or positions.dtype != torch.int64 or not positions.is_contiguous()
                or positions.shape != (T,)):
            raise ValueError("the layer stack takes float32 rows of the model's width, one "
                             "int64 position and one prepared decode each")
        nqkv, inter = (st.nh + 2 * st.nkv) * st.d, st.inter
        out = torch.empty_like(h)
        scratch = torch.empty(T * (H + nqkv + st.nh * st.d + H + 3 * inter), dtype=torch.float32)
        ptr, f = scratch.data_ptr(), 4
        st.T, st.h, st.out, st.positions = T, h.data_ptr(), out.data_ptr(), positions.data_ptr()
        for name, size in (("x", H), ("qkv", nqkv), ("attn", st.nh * st.d), ("delta", H),
                           ("gu", 2 * inter), ("act", inter)):
            setattr(st, name, ptr)
            ptr += T * size * f
        kvn = None
        if decode.round_kv:
            kvn = torch.empty(T * 2 * st.nkv * st.d, dtype=kern.KV_DTYPE)
        w, r = decode.write_args, decode.run_args
        st.kvn = kvn.data_ptr() if kvn is not None else None
        st.cache, st.layer_bytes = decode.base, decode.layer_bytes
        st.block_stride, st.v_off, st.num_blocks, st.bs = w[0], w[1], w[2], w[3]
        st.slot_block, st.slot_offset, st.kv_elem = w[4], w[5], w[8]
        st.tables, st.max_blocks, st.seq_lens = r[2], r[3], r[4]
        st.scale, st.threads = r[10], r[11]
        st.write_kv, st.decode = fn_address(kern._write), fn_address(kern._fn)
        rc = self._fn(ctypes.byref(st))
        if rc != 0:
            layer, code = divmod(-rc, 100)
            what = {1: "a GEMM refused its input or ran out of memory",
                    2: "a slot is outside the cache",
                    3: "a sequence length is outside its block table",
                    4: "a shape does not fit the plan"}.get(code, f"code {code}")
            raise RuntimeError(f"layer stack, layer {layer}: {what}")
        return out


class PagedPrefillKernel(_OneDtype):
    """Causal attention of one prefill chunk over a bfloat16 cache laid out as the engine's
    [num_blocks, layers, 2, block_size, kv_heads, head_dim], every one of the chunk's
    context tokens (its own included) already written."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = getattr(lib, f"splitserve_paged_prefill_{self.SUFFIX}")
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i32, i32,
                       i32, i32, ctypes.c_float, i32]
        fn.restype = i32
        self._fn = fn

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                 block_table: torch.Tensor, ctx: int, scale: float,
                 out: torch.Tensor | None = None, num_threads: int = 1) -> torch.Tensor:
        """q [q_len, heads, head_dim] in DTYPE, each row's heads contiguous (any row stride),
        at positions ctx - q_len .. ctx - 1; block_table: the chunk's block ids, contiguous
        int64, covering ctx tokens. Query head j of kv head h is h * g + j (HF's grouping).
        Writes and returns `out` (same shape and inner layout as q; a new tensor if None)."""
        if q.dim() != 3 or kv_cache.dim() != 6:
            raise ValueError("the paged-prefill kernel takes q [q_len, heads, head_dim] and a "
                             "cache [blocks, layers, 2, block_size, kv_heads, head_dim]")
        q_len, nh, d = q.shape
        num_blocks, layers, two, bs, nkv, hd = kv_cache.shape
        if q.dtype != self.DTYPE or kv_cache.dtype != self.DTYPE:
            raise ValueError(f"the paged-prefill kernel takes {self.dtype_name} q and cache")
        if {t.device.type for t in (q, kv_cache, block_table)} != {"cpu"}:
            raise ValueError("the paged-prefill kernel takes CPU tensors")
        if hd != d or two != 2 or nh % nkv:
            raise ValueError(f"the paged-prefill kernel: q's {nh} heads of {d} do not fit the "
                             f"cache's {nkv} kv heads of {hd}")
        if not kv_cache.is_contiguous() or q.stride(2) != 1 or q.stride(1) != d:
            raise ValueError("the paged-prefill kernel takes a contiguous cache and q rows "
                             "with contiguous heads")
        if not 0 <= layer < layers:
            raise ValueError(f"the paged-prefill kernel: layer {layer} outside the cache's "
                             f"{layers}")
        if (block_table.dtype != torch.int64 or block_table.dim() != 1
                or not block_table.is_contiguous()):
            raise ValueError("the paged-prefill kernel takes a contiguous 1-D int64 block table")
        if not q_len <= ctx <= block_table.shape[0] * bs:
            raise ValueError(f"the paged-prefill kernel: context {ctx} outside its block "
                             f"table ({block_table.shape[0]} blocks of {bs}) or shorter than "
                             f"the chunk ({q_len})")
        if out is None:
            out = torch.empty(q_len, nh, d, dtype=self.DTYPE)
        elif (out.shape != q.shape or out.dtype != self.DTYPE or out.stride(2) != 1
              or out.stride(1) != d or out.device.type != "cpu"):
            raise ValueError(f"the paged-prefill kernel writes {self.dtype_name} rows shaped "
                             f"as q's, heads contiguous")
        layer_k = _layer_ptr(kv_cache, layer)
        rc = self._fn(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), layer_k,
                      kv_cache.stride(0), kv_cache.stride(2), block_table.data_ptr(),
                      block_table.shape[0], num_blocks, q_len, ctx, nkv, nh // nkv, d, bs,
                      scale, num_threads)
        if rc == -2:
            raise MemoryError("paged-prefill kernel: out of memory for its scratch")
        if rc == -3:
            raise ValueError("paged-prefill kernel: a block id is outside the cache")
        if rc != 0:
            raise ValueError("paged-prefill kernel refused its shapes")
        return out


class PagedPrefillKernelF32(PagedPrefillKernel):
    """The same for a float32 cache (AVX2 and FMA): the float32 engine's prefill chunks."""

    DTYPE = torch.float32
    SUFFIX = "f32"


class SmallGemm:
    """bfloat16 y = x @ W.T (+ b) on weights packed once by `pack` (csrc/small_gemm.c)."""

    TILE_N = 64

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.splitserve_pack_bf16.argtypes = [ptr, ptr, i64, i64]
        lib.splitserve_pack_bf16.restype = None
        fn = lib.splitserve_small_gemm_bf16
        fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._lib, self._fn = lib, fn

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] bfloat16 (K even) → the kernel's tiled layout (N rounded up to 64)."""
        n, k = weight.shape
        if weight.dtype != torch.bfloat16 or k % 2:
            raise ValueError("small_gemm packs bfloat16 weights with an even input size")
        w = weight.contiguous()
        out = torch.empty(-(-n // self.TILE_N) * self.TILE_N, k, dtype=torch.bfloat16)
        self._lib.splitserve_pack_bf16(w.data_ptr(), out.data_ptr(), n, k)
        return out

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, n: int,
                 bias: torch.Tensor | None = None, num_threads: int = 1) -> torch.Tensor:
        """x [M, K] bfloat16 with unit column stride → [M, n] bfloat16."""
        m, k = x.shape
        if x.dtype != torch.bfloat16 or x.stride(1) != 1 or packed.shape[1] != k:
            raise ValueError("small_gemm takes bfloat16 rows of the packed weight's width")
        if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
            raise ValueError("small_gemm takes a contiguous bfloat16 bias")
        y = torch.empty(m, n, dtype=torch.bfloat16)
        rc = self._fn(x.data_ptr(), x.stride(0), m, packed.data_ptr(), n, k,
                      bias.data_ptr() if bias is not None else None, y.data_ptr(), n,
                      num_threads)
        if rc != 0:
            raise RuntimeError("small_gemm kernel refused its input")
        return y


@dataclass(frozen=True)
class PackedQuant:
    """A quantized weight in QuantGemm's layout: fmt "q4_1" or "q8_0", [n, k] logically."""

    fmt: str
    data: torch.Tensor
    n: int
    k: int


class QuantGemm:
    """bfloat16 y = x @ W.T (+ b) for a GGUF Q4_1 or Q8_0 weight (`engine.quant`) packed once
    by `pack` (csrc/quant_gemm.c): 5 (Q4_1) or 8.5 (Q8_0) bits a weight read per step
    instead of 16."""

    TILE_N, GROUP = 16, 32
    BYTES = {"q4_1": 320, "q8_0": 544}  # a tile's group of 32 inputs, packed
    DTYPE = torch.bfloat16
    PACK_SUFFIX, GEMM_SUFFIX = "", "bf16"  # the library's symbol names

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._pack = {fmt: getattr(lib, f"splitserve_pack_{fmt}{self.PACK_SUFFIX}")
                      for fmt in self.BYTES}
        pack_args = {"q4_1": [ptr, ptr, ptr, ptr, i64, i64], "q8_0": [ptr, ptr, ptr, i64, i64]}
        for fmt, fn in self._pack.items():
            fn.argtypes = pack_args[fmt]
        self._fns = {fmt: getattr(lib, f"splitserve_{fmt}_gemm_{self.GEMM_SUFFIX}")
                     for fmt in self.BYTES}
        for fn in self._pack.values():
            fn.restype = None
        for fn in self._fns.values():
            fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
            fn.restype = ctypes.c_int

    def pack(self, w) -> PackedQuant:
        """A Q4_1Weight or Q8_0Weight [N, K] (K a multiple of 32) → the kernel's layout."""
        n, k = w.shape
        if k % self.GROUP:
            raise ValueError(f"quant_gemm packs rows of a multiple of {self.GROUP} weights, got {k}")
        fmt = w.FORMAT
        if fmt not in self.BYTES:
            raise ValueError(f"{type(self).__name__} takes {'/'.join(self.BYTES)} weights, "
                             f"not {fmt}")
        d = w.d.to(torch.float16).contiguous()  # exact: GGUF stores them as fp16
        out = torch.empty(-(-n // self.TILE_N) * (k // self.GROUP) * self.BYTES[fmt],
                          dtype=torch.uint8)
        if fmt == "q4_1":
            q = w.q.to(torch.uint8).contiguous()
            m = w.m.to(torch.float16).contiguous()
            self._pack[fmt](q.data_ptr(), d.data_ptr(), m.data_ptr(), out.data_ptr(), n, k)
        else:
            q = w.q.to(torch.int8).contiguous()
            self._pack[fmt](q.data_ptr(), d.data_ptr(), out.data_ptr(), n, k)
        return PackedQuant(fmt, out, n, k)

    def __call__(self, x: torch.Tensor, w: PackedQuant, bias: torch.Tensor | None = None,
                 num_threads: int = 1) -> torch.Tensor:
        """x [M, K] in DTYPE with unit column stride → [M, N] in DTYPE."""
        m, k = x.shape
        dt = self.DTYPE
        if x.dtype != dt or x.stride(1) != 1 or k != w.k:
            raise ValueError(f"quant_gemm takes {dt} rows of the packed weight's width")
        if bias is not None and (bias.dtype != dt or not bias.is_contiguous()
                                 or bias.shape != (w.n,)):
            raise ValueError(f"quant_gemm takes a contiguous {dt} bias, one per output")
        y = torch.empty(m, w.n, dtype=dt)
        rc = self._fns[w.fmt](x.data_ptr(), x.stride(0), m, w.data.data_ptr(), w.n, k,
                              bias.data_ptr() if bias is not None else None, y.data_ptr(), w.n,
                              num_threads)
        if rc == -2:
            raise MemoryError("quant_gemm kernel: out of memory for its scratch")
        if rc != 0:
            raise RuntimeError("quant_gemm kernel refused its input")
        return y


class QuantGemmF32(QuantGemm):
    """The same in float32 (csrc/quant_gemm_f32.c: AVX2, FMA and F16C), for the float32
    engine: 6.4x (Q4_1) and 3.8x (Q8_0) fewer bytes read per step than dense float32."""

    TILE_N = 8
    BYTES = {"q4_1": 160, "q8_0": 272}
    DTYPE = torch.float32
    PACK_SUFFIX, GEMM_SUFFIX = "_f32", "f32"


class QuantGemmA8(QuantGemm):
    """float32 y = x @ W.T (+ b) for a Q4_1 weight with x quantized to int8 per group of 32
    inside the call (csrc/quant_gemm_a8.c, AVX2, and AVX512-VNNI where the CPU
    has it: `--quantization w4a8`): integer dot products, 1.7x the float32 kernel at one row
    and 2.1-2.75x at 16-2,048 rows of SmolLM2's projections on an AVX2 EPYC (best of 5, 2
    threads; README, *Weights*), not exact (x's rounding: ~0.5 % of a GEMM's output)."""

    TILE_N = 8
    BYTES = {"q4_1": 160}
    DTYPE = torch.float32
    PACK_SUFFIX, GEMM_SUFFIX = "_a8", "a8"  # QuantGemmF32's packing, exported again


class QuantGemmA8BF16(QuantGemmA8):
    """The same for a bfloat16 model: bfloat16 x, bias and y (x widened exactly, so y is the
    float32 kernel's output on x.float() rounded once to bfloat16)."""

    DTYPE = torch.bfloat16
    GEMM_SUFFIX = "a8_bf16"


class LayerOps(_OneDtype):
    """bfloat16 elementwise steps of a Llama-family layer (csrc/layer_ops.c), each rounding
    where the torch code it replaces rounds."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        fns = {op: getattr(lib, f"splitserve_{op}_{self.SUFFIX}")
               for op in ("add_rms_norm", "rope", "silu_mul")}
        fns["add_rms_norm"].argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, i32]
        fns["rope"].argtypes = [ptr, i64, i64, i32, i32, ptr, ptr, ptr, i32]
        fns["silu_mul"].argtypes = [ptr, ptr, i64, i64, i32]
        for fn in fns.values():
            fn.restype = None
        self._fns = fns

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.dtype != self.DTYPE or not t.is_contiguous():
                raise ValueError(f"layer ops take contiguous {self.dtype_name} tensors")

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """h += delta (in place, when given); returns RMSNorm(h) * weight. h: [T, H]."""
        self._check(h, weight, *([delta] if delta is not None else []))
        T, H = h.shape
        if weight.shape != (H,) or (delta is not None and delta.shape != h.shape):
            raise ValueError("add_rms_norm: shapes differ")
        out = torch.empty_like(h)
        self._fns["add_rms_norm"](
            h.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(),
            out.data_ptr(), T, H, eps, torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `heads` heads of each row of x [T, >= heads * head_dim] in place;
        cos, sin: [max_positions, head_dim] tables; positions: [T] int64, each inside the
        tables (the caller checks, once a step)."""
        self._check(cos, sin)
        T = x.shape[0]
        if (x.dtype != self.DTYPE or x.stride(1) != 1 or x.shape[1] < heads * head_dim
                or cos.shape[1] != head_dim or head_dim % 2):
            raise ValueError(f"rope_: x rows must hold the heads, in {self.dtype_name}")
        if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.shape != (T,):
            raise ValueError("rope_: positions must be contiguous int64, one per row")
        self._fns["rope"](x.data_ptr(), T, x.stride(0), heads, head_dim, positions.data_ptr(),
                          cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """gu [T, 2I] (gate, up) → silu(gate) * up, [T, I]."""
        self._check(gu)
        T, two_i = gu.shape
        out = torch.empty(T, two_i // 2, dtype=gu.dtype)
        self._fns["silu_mul"](gu.data_ptr(), out.data_ptr(), T, two_i // 2,
                              torch.get_num_threads())
        return out


class LayerOpsF32(LayerOps):
    """The same steps in float32 (AVX2), each product and sum rounded where torch's float32
    code rounds them: the float32 engine's, e.g. on a CPU without bfloat16 units."""

    DTYPE = torch.float32
    SUFFIX = "f32"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return next((c for c in map(shutil.which, COMPILERS) if c), None)


def cache_dir() -> Path:
    return splitserve_cache("kernels")


def build(source: Path, out_dir: Path, compiler: str) -> Path:
    """Compile `source` into out_dir (reusing an earlier build of the same inputs: the
    source, the headers beside it, flags, compiler and CPU)."""
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, " ".join(CFLAGS).encode(), compiler.encode(),
                 _cpu_signature().encode(), platform.machine().encode()):
        key.update(part)
    target = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, str(source), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def load_library(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c built and loaded, or None (logged once) when that cannot be done here."""
    what = f"{name} kernel"
    if platform.system() != "Linux":
        logger.info("%s: built on Linux only; using torch", what)
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("%s: no C compiler (%s) on PATH; using torch (slower)", what,
                       "/".join(COMPILERS))
        return None
    source = CSRC / f"{name}.c"
    try:
        try:
            path = build(source, cache_dir(), compiler)
        except OSError:  # an unwritable home: build beside other temporary files
            path = build(source, Path(tempfile.gettempdir()) / "splitserve-kernels", compiler)
        lib = ctypes.CDLL(str(path))
    except subprocess.CalledProcessError as e:
        logger.warning("%s: %s failed (%s); using torch", what, compiler,
                       (e.stderr or "").strip()[-500:])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("%s unavailable (%s); using torch", what, e)
        return None
    logger.info("%s: %s", what, path)
    return lib


def _vectorized(lib: ctypes.CDLL | None, name: str, needs: str = "AVX512-BF16") -> bool:
    """Whether a library was built with the instructions of the fast paths its probe
    `splitserve_<name>_available` reports (`needs`; without them torch's vectorised ops are
    faster than the scalar C)."""
    if lib is None:
        return False
    if not getattr(lib, f"splitserve_{name}_available")():
        logger.info("%s kernel: built without %s here; not used", name, needs)
        return False
    return True


def _kernel_loader(name: str, wrapper, needs: str = "AVX512-BF16", probe: str | None = None):
    """load_<probe>(): csrc/<name>.c wrapped, or None where it is not built with `needs`
    (the library's `splitserve_<probe>_available`; probe defaults to name: one library may
    hold a bfloat16 and a float32 kernel, each with its probe). One wrapper per process
    (every Linear asks for the GEMM at load)."""
    probe = probe or name

    @functools.lru_cache(maxsize=1)
    def load():
        lib = load_library(name)
        return wrapper(lib) if _vectorized(lib, probe, needs) else None

    load.__name__ = load.__qualname__ = f"load_{probe}"
    load.library, load.probe = name, probe
    return load


load_paged_decode = _kernel_loader("paged_decode", PagedDecodeKernel)
load_paged_decode_f32 = _kernel_loader("paged_decode", PagedDecodeKernelF32, "AVX2/FMA",
                                       "paged_decode_f32")
load_paged_decode_f32_bf16kv = _kernel_loader("paged_decode", PagedDecodeKernelF32BF16KV,
                                              "AVX2/FMA", "paged_decode_f32")
load_paged_decode_bf16_fp8kv = _kernel_loader("paged_decode", PagedDecodeKernelBF16FP8KV,
                                              "AVX2/FMA/F16C", "paged_decode_f32")
load_paged_decode_f32_fp8kv = _kernel_loader("paged_decode", PagedDecodeKernelF32FP8KV,
                                             "AVX2/FMA/F16C", "paged_decode_f32")
load_paged_prefill = _kernel_loader("paged_prefill", PagedPrefillKernel)
load_paged_prefill_f32 = _kernel_loader("paged_prefill", PagedPrefillKernelF32, "AVX2/FMA",
                                        "paged_prefill_f32")
load_small_gemm = _kernel_loader("small_gemm", SmallGemm)
load_quant_gemm = _kernel_loader("quant_gemm", QuantGemm)
load_quant_gemm_f32 = _kernel_loader("quant_gemm_f32", QuantGemmF32, "AVX2/FMA/F16C")
load_quant_gemm_a8 = _kernel_loader("quant_gemm_a8", QuantGemmA8, "AVX2/FMA/F16C")
load_quant_gemm_a8_bf16 = _kernel_loader("quant_gemm_a8", QuantGemmA8BF16, "AVX2/FMA/F16C")
load_layer_ops = _kernel_loader("layer_ops", LayerOps)
load_layer_ops_f32 = _kernel_loader("layer_ops", LayerOpsF32, "AVX2/FMA", "layer_ops_f32")
load_layer_stack = _kernel_loader("layer_stack", LayerStack, "nothing")
_LOADERS = (load_paged_decode, load_paged_decode_f32, load_paged_decode_f32_bf16kv,
            load_paged_decode_f32_fp8kv, load_paged_decode_bf16_fp8kv,
            load_paged_prefill,
            load_paged_prefill_f32, load_small_gemm, load_quant_gemm, load_quant_gemm_f32,
            load_quant_gemm_a8, load_quant_gemm_a8_bf16,
            load_layer_ops, load_layer_ops_f32, load_layer_stack)


def clear_caches() -> None:
    """Forget loaded kernels (tests that change what a load finds)."""
    load_library.cache_clear()
    for fn in _LOADERS:
        fn.cache_clear()


def prebuild() -> dict[str, bool]:
    """Build (or find) every kernel in csrc/ now; set-up calls it so that workers never
    compile. Returns name -> built and loaded here."""
    return {src.stem: load_library(src.stem) is not None for src in sorted(CSRC.glob("*.c"))}
