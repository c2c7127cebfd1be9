"""The CPU paged-decode kernel (`csrc/paged_decode.c`): built with the system C compiler on
first use, cached, loaded with ctypes.

Lifecycle: `load_paged_decode()` hashes the source, the compiler flags and this CPU's
model and feature flags (`-march=native` code runs only where it was built), looks for
`~/.cache/splitserve/kernels/paged_decode-<hash>.so`, and otherwise compiles it there (to
a temporary name, then renamed, so workers starting together never load a half-written
file). No compiler, a failed build or a failed load gives None once, with a warning, and
callers keep the torch path. The library is plain C with OpenMP: no Python or torch
headers, so any `cc` builds it in about a second, and it joins the OpenMP runtime torch
has already loaded (same soname) instead of starting a second thread pool.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILERS = ("cc", "gcc", "clang")


class PagedDecodeKernel:
    """Decode attention for bfloat16 caches laid out as the engine's
    [num_blocks, layers, 2, block_size, kv_heads, head_dim]."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.splitserve_paged_decode_bf16
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, i64, ptr, i32, i32, i32, i32, i32,
                       ctypes.c_float, i32]
        fn.restype = i32
        self._fn = fn

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_threads: int = 1) -> torch.Tensor:
        """q [D, heads, head_dim] (each request's heads contiguous); block_table [D, max_blocks]
        and seq_lens [D] int64 (tokens in the cache incl. this one) → [D, heads, head_dim]."""
        D, nh, d = q.shape
        _, layers, two, bs, nkv, hd = kv_cache.shape
        if kv_cache.dtype != torch.bfloat16 or q.dtype != torch.bfloat16 or hd != d or two != 2:
            raise ValueError("the paged-decode kernel takes bfloat16 q and cache of one head_dim")
        if not kv_cache.is_contiguous() or q.stride(2) != 1 or q.stride(1) != d:
            raise ValueError("the paged-decode kernel takes a contiguous cache and q rows")
        if nh % nkv or not 0 <= layer < layers:
            raise ValueError(f"bad heads ({nh} over {nkv} kv heads) or layer {layer}")
        for t in (block_table, seq_lens):
            if t.dtype != torch.int64 or not t.is_contiguous():
                raise ValueError("block_table and seq_lens must be contiguous int64")
        if block_table.shape[0] != D or seq_lens.shape != (D,):
            raise ValueError("block_table and seq_lens need one row per request")
        out = torch.empty(D, nh, d, dtype=q.dtype)
        layer_k = kv_cache.data_ptr() + layer * kv_cache.stride(1) * kv_cache.element_size()
        rc = self._fn(q.data_ptr(), q.stride(0), out.data_ptr(), layer_k, kv_cache.stride(0),
                      kv_cache.stride(2), block_table.data_ptr(), block_table.shape[1],
                      seq_lens.data_ptr(), D, nkv, nh // nkv, d, bs, scale, num_threads)
        if rc == -2:
            raise MemoryError("paged-decode kernel: out of memory for its scratch")
        if rc != 0:
            raise ValueError("paged-decode kernel: a sequence length is outside its block table")
        return out


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
    return Path.home() / ".cache" / "splitserve" / "kernels"


def build(out_dir: Path, compiler: str) -> Path:
    """Compile the kernel into out_dir (reusing an earlier build of the same inputs)."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), compiler.encode(),
                 _cpu_signature().encode(), platform.machine().encode()):
        key.update(part)
    target = out_dir / f"paged_decode-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def load_paged_decode() -> PagedDecodeKernel | None:
    """The kernel, or None (logged once) when it cannot be built or loaded here."""
    if platform.system() != "Linux":
        logger.info("paged-decode kernel: built on Linux only; using torch decode attention")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("paged-decode kernel: no C compiler (%s) on PATH; using torch decode "
                       "attention (slower at long contexts)", "/".join(COMPILERS))
        return None
    try:
        try:
            path = build(cache_dir(), compiler)
        except OSError:  # an unwritable home: build beside other temporary files
            path = build(Path(tempfile.gettempdir()) / "splitserve-kernels", compiler)
        kernel = PagedDecodeKernel(ctypes.CDLL(str(path)))
    except subprocess.CalledProcessError as e:
        logger.warning("paged-decode kernel: %s failed (%s); using torch decode attention",
                       compiler, (e.stderr or "").strip()[-500:])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("paged-decode kernel unavailable (%s); using torch decode attention", e)
        return None
    logger.info("paged-decode kernel: %s", path)
    return kernel
