"""Attention backends behind one small interface, chosen by name.

`torch` is the reference backend (CPU and any device, pure torch SDPA over the paged cache);
`cpu` is that backend with decodes and prefill chunks on a bfloat16 cache run by native
paged-decode and paged-prefill kernels (built on first use; the torch path where no compiler
is found); `flashinfer` runs paged prefill/decode kernels on CUDA when the package is
installed.
"""

from __future__ import annotations

from .base import AttentionBackend, AttentionMetadata, build_metadata

_BACKENDS = {
    "torch": "splitserve.engine.attention.torch_ref:TorchAttentionBackend",
    "cpu": "splitserve.engine.attention.cpu:CpuAttentionBackend",
    "flashinfer": "splitserve.engine.attention.flashinfer_backend:FlashInferAttentionBackend",
}


def get_backend(name: str, device, dtype=None) -> AttentionBackend:
    """Instantiate a backend; `auto` picks flashinfer on CUDA when importable, cpu on CPU,
    else torch. dtype: the model's (the cpu backend picks its kernels by it and the
    cache's)."""
    import importlib

    if name == "auto":
        kind = getattr(device, "type", str(device))
        name = "cpu" if kind == "cpu" else "torch"
        if kind == "cuda":
            try:
                importlib.import_module("flashinfer")
                name = "flashinfer"
            except ImportError:
                pass
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(dtype) if name == "cpu" else cls()


__all__ = ["AttentionBackend", "AttentionMetadata", "build_metadata", "get_backend"]
