"""GGUF files: metadata -> ModelConfig, tensors -> HF-named state dict.

llama.cpp's converter renames every tensor (`blk.N.attn_q.weight`, ...) and, for the `llama`
architecture only (Llama, Mistral), permutes the rows of q_proj / k_proj (weights and biases)
from HF's rotate-half RoPE layout into its interleaved-pair layout:

    w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)

with n_head = num_heads for q and num_kv_heads for k. Loading undoes that exactly as
transformers does (`reshape(n_head, rows // n_head // 2, 2, ...).swapaxes(1, 2)`). Qwen2 and
Qwen3 files are written unpermuted. A Llama 3.1-style `rope_freqs.weight` tensor is turned
back into the `llama3` rope_scaling dict it was generated from.
"""

from __future__ import annotations

import logging
import math
import pathlib
import re
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from splitserve.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from splitserve.engine.errors import ModelSpecError
from splitserve.engine.model_loader.gguf_header import GgufHeader, read_gguf_header
from splitserve.engine.model_loader.names import check_complete, expected_shapes
from splitserve.engine.quant import Q4_1Weight, Q8_0Weight

logger = logging.getLogger(__name__)

#: GGUF `general.architecture` -> HF architecture.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
#: llama.cpp permutes q/k rows for these GGUF architectures only.
_PERMUTED_ARCHS = ("llama",)

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_LEAVES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name, or None if it has none."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_LEAVES:
        return f"model.layers.{m.group(1)}.{_BLOCK_LEAVES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_architecture(header: GgufHeader) -> str:
    """The HF architecture of a GGUF file; ModelSpecError naming it if unsupported."""
    arch = header.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ModelSpecError(
            f"{header.path} holds GGUF architecture {arch!r}; supported GGUF architectures: "
            f"{', '.join(GGUF_ARCHITECTURES)} (i.e. {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if arch == "llama" and "mistral" in str(header.metadata.get("general.name", "")).lower():
        return "MistralForCausalLM"  # llama.cpp writes Mistral as `llama`; the math is the same
    return GGUF_ARCHITECTURES[arch]


def _llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int
) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for a `llama3` rope_scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _read_f32_tensor(header: GgufHeader, name: str) -> np.ndarray:
    info = header.tensors[name]
    if info.ggml_type != 0:  # F32
        raise ModelSpecError(f"{header.path}: {name} is not stored as F32")
    count = int(np.prod(info.shape))
    return np.fromfile(header.path, dtype=np.float32, count=count, offset=header.data_start + info.offset)


def _rope_scaling(header: GgufHeader, prefix: str, head_dim: int, theta: float, ctx: int) -> dict | None:
    md = header.metadata
    if _ROPE_FREQS in header.tensors:
        stored = _read_f32_tensor(header, _ROPE_FREQS)
        factor = float(stored.max())
        old_ctx = int(md.get(f"{prefix}.rope.scaling.original_context_length", 8192))
        params = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=old_ctx)
        expect = _llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, old_ctx)
        if stored.shape != expect.shape or not np.allclose(stored, expect, rtol=1e-5, atol=1e-6):
            raise ModelSpecError(
                f"{header.path}: rope_freqs.weight does not match a llama3 rope scaling with "
                f"low_freq_factor=1, high_freq_factor=4, original context {old_ctx}; not supported"
            )
        return {"rope_type": "llama3", **params}
    kind = md.get(f"{prefix}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(md.get(f"{prefix}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(
                md.get(f"{prefix}.rope.scaling.original_context_length", ctx)
            ),
        }
    raise ModelSpecError(f"{header.path}: rope scaling type {kind!r} is not supported")


def config_from_gguf(header: GgufHeader) -> ModelConfig:
    """ModelConfig from GGUF metadata (`<arch>.*` and `tokenizer.ggml.*` keys)."""
    arch = gguf_architecture(header)
    prefix = header.architecture
    md = header.metadata

    def need(key: str) -> Any:
        full = f"{prefix}.{key}"
        if full not in md:
            raise ModelSpecError(f"{header.path} lacks GGUF metadata {full!r}")
        return md[full]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = md.get(f"{prefix}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ModelSpecError(f"{header.path}: per-layer KV head counts are not supported")
    head_dim = int(
        md.get(f"{prefix}.attention.key_length")
        or md.get(f"{prefix}.rope.dimension_count")
        or hidden // heads
    )
    if "token_embd.weight" not in header.tensors:
        raise ModelSpecError(f"{header.path} has no token_embd.weight tensor")
    vocab_size = header.tensors["token_embd.weight"].shape[0]
    theta = float(md.get(f"{prefix}.rope.freq_base", 10000.0))
    ctx = int(need("context_length"))
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = md.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    bos = md.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=_rope_scaling(header, prefix, head_dim, theta, ctx),
        max_position_embeddings=ctx,
        tie_word_embeddings="output.weight" not in header.tensors,
        attention_bias="blk.0.attn_q.bias" in header.tensors,
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


def state_dict_from_gguf(
    header: GgufHeader, cfg: ModelConfig, dtype: torch.dtype, progress: bool,
    keep_quantized: bool = False,
) -> dict[str, torch.Tensor | Q4_1Weight | Q8_0Weight]:
    """The tensors of `header`'s file: dequantized one by one, renamed to HF, the q/k
    permutation undone, cast to `dtype`.

    With `keep_quantized`, 2-D Q4_1 and Q8_0 tensors stay quantized: they come back as
    `Q4_1Weight`s / `Q8_0Weight`s (already un-permuted) for the CPU kernels of
    `engine/quant.py`; everything else is dequantized.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kept = {GGMLQuantizationType.Q4_1: Q4_1Weight, GGMLQuantizationType.Q8_0: Q8_0Weight}
    path = header.path
    permuted = header.architecture in _PERMUTED_ARCHS
    expected = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    tensors = tensor_arrays(header)
    for info, qtype, data in tqdm(tensors, total=len(header.tensors), desc=f"Loading {path.name}",
                                  unit="tensor", disable=not progress):
        name = hf_name(info.name)
        if name is None or name not in expected:
            if info.name != _ROPE_FREQS:  # consumed by load_model_config
                logger.warning("%s: ignoring unexpected tensor %s", path, info.name)
            continue
        shape = info.shape  # (rows, cols) as HF has it
        if keep_quantized and qtype in kept and len(shape) == 2:
            q = kept[qtype].from_gguf_blocks(data, *shape)
            out[name] = q.map_rows(lambda t: _unpermute_if(permuted, name, t, cfg))
            continue
        values = dequantize(data, qtype)
        w = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(shape)
        out[name] = _unpermute_if(permuted, name, w, cfg).to(dtype).contiguous()
        del values
    check_complete(str(path), cfg, out, expected)
    return {name: out[name] for name in expected}


#: ggml types whose values are stored as plain numbers: their numpy dtype.
_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                27: np.int64, 28: np.float64}


def tensor_arrays(header: GgufHeader):
    """(info, ggml type, data) for each tensor of `header`'s file, in file order, `data` a
    read-only view of the memory-mapped file shaped as `gguf.GGUFReader` shapes it: the
    values for plain types (F32, F16, the integers), else the rows' bytes ([rows, cols /
    block * block_bytes] uint8, what `gguf.quants.dequantize` takes). `GGUFReader` would
    first build a numpy view for every element of every metadata array (seconds on the
    default model's vocabulary: building its engine took 5.7-7.7 s with it, 1.0-1.9 s
    without); the tensor table `read_gguf_header` parsed is all this needs. Raises
    ModelSpecError for an unknown type or data past the file's end."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    blob = np.memmap(header.path, dtype=np.uint8, mode="r")
    for info in header.tensors.values():
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelSpecError(f"{header.path}: tensor {info.name} has unknown ggml type "
                                 f"{info.ggml_type}") from None
        count = math.prod(info.shape)
        if info.shape and info.shape[-1] % block:
            raise ModelSpecError(f"{header.path}: tensor {info.name}'s rows ({info.shape[-1]}) "
                                 f"are not whole {qtype.name} blocks of {block}")
        start, size = header.data_start + info.offset, count // block * block_bytes
        if start + size > blob.size:
            raise ModelSpecError(f"{header.path}: tensor {info.name}'s data ({size} bytes at "
                                 f"{start}) does not fit the file ({blob.size} bytes)")
        raw = blob[start : start + size]
        if qtype in _PLAIN_TYPES:
            data = raw.view(_PLAIN_TYPES[qtype]).reshape(info.shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(info.shape, qtype))
        yield info, qtype, data


def _unpermute_if(permuted: bool, name: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if permuted and ".self_attn.q_proj." in name:
        return unpermute_qk(w, cfg.num_heads)
    if permuted and ".self_attn.k_proj." in name:
        return unpermute_qk(w, cfg.num_kv_heads)
    return w


def load_gguf_config(path: pathlib.Path) -> ModelConfig:
    return config_from_gguf(read_gguf_header(path))
