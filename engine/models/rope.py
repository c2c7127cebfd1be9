"""Rotary position embeddings, with HF's rope_scaling variants (default, linear, llama3)."""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def inv_freq_for(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32) and the attention scaling factor, as HF computes them."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(cfg.rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        inv_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_llama), 1.0
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by position; applies HF's rotate-half rotation."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        inv_freq, attn_scale = inv_freq_for(cfg)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attn_scale).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * attn_scale).to(dtype=dtype, device=device)
        self.half = cfg.head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]."""
        x1 = x[..., : self.half]
        x2 = x[..., self.half :]
        rotated = torch.cat((-x2, x1), dim=-1)
        return x * cos + rotated * sin
