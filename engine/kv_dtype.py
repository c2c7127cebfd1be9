"""What a KV cache of a narrower dtype than the model's stores (`--kv-cache-dtype`)."""

from __future__ import annotations

import torch

#: `--kv-cache-dtype fp8`: float8 e4m3 without a scale (a cached value is the value, as in
#: vLLM without calibrated scales), saturated at its largest finite value.
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to the cache's dtype (round to nearest even). Float8 saturates at +-448,
    infinities included, whatever torch's conversion does past the range (c10's scalar one
    gives NaN from 480 up): one NaN key would poison every later score of its request."""
    if dtype == FP8 and x.dtype != FP8:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)
