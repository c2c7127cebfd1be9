"""Dispatch on ModelSource.kind: config and weights from a GGUF file or a HF directory."""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.model_loader.gguf_header import read_gguf_header
from splitserve.engine.model_loader.gguf_weights import (
    config_from_gguf,
    load_gguf_config,
    state_dict_from_gguf,
)
from splitserve.engine.model_loader.hf_dir import config_from_dir, state_dict_from_dir
from splitserve.engine.model_loader.source import ModelSource


def load_model_config(source: ModelSource) -> ModelConfig:
    """The ModelConfig of `source` (config.json, or GGUF metadata)."""
    if source.kind == "gguf":
        return load_gguf_config(source.path)
    return config_from_dir(source.path)


def load_state_dict(
    source: ModelSource, dtype: torch.dtype = torch.float32, progress: bool = True,
    keep_quantized: bool = False,
) -> dict:
    """HF-named, contiguous tensors in `dtype`, exactly `names.expected_parameter_names(cfg)`.

    GGUF tensors are dequantized one at a time (peak memory: the result plus one tensor);
    `lm_head.weight` is present only when the embeddings are not tied. A tqdm bar over the
    tensors is shown when `progress`. `keep_quantized`: a GGUF file's Q4_1 and Q8_0 matrices
    come back as `engine.quant.Q4_1Weight` / `Q8_0Weight` instead of dequantized (ignored
    for HF directories).
    """
    return load_model(source, dtype, progress, keep_quantized)[1]


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, progress: bool = True,
    keep_quantized: bool = False,
) -> tuple[ModelConfig, dict]:
    """`load_model_config` and `load_state_dict` together, a GGUF file's header parsed once
    for both."""
    if source.kind == "gguf":
        header = read_gguf_header(source.path)
        cfg = config_from_gguf(header)
        return cfg, state_dict_from_gguf(header, cfg, dtype, progress, keep_quantized)
    cfg = config_from_dir(source.path)
    return cfg, state_dict_from_dir(source.path, cfg, dtype, progress)
