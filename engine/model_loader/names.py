"""The Hugging Face parameter names a Llama-family decoder has, given its ModelConfig."""

from __future__ import annotations

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import ModelSpecError


def expected_parameter_names(cfg: ModelConfig) -> list[str]:
    """Every tensor `load_state_dict` returns for `cfg`, in model order.

    `lm_head.weight` only when the embeddings are not tied; q/k/v biases for Qwen2-style
    `attention_bias`; q/k norms for Qwen3-style `qk_norm`.
    """
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            names.append(f"{p}self_attn.{proj}_proj.weight")
            if cfg.attention_bias and proj != "o":
                names.append(f"{p}self_attn.{proj}_proj.bias")
        if cfg.qk_norm:
            names += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"]
        names += [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of `expected_parameter_names(cfg)`."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, ff = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    leaf = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    top = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    shapes = {}
    for name in expected_parameter_names(cfg):
        shapes[name] = top[name] if name in top else leaf[name.split(".", 3)[3]]
    return shapes


def check_complete(
    source_desc: str, cfg: ModelConfig, tensors: dict, expected: dict[str, tuple[int, ...]]
) -> None:
    """Raise ModelSpecError if `tensors` misses an expected name or has a wrong shape."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelSpecError(
            f"{source_desc} lacks tensors a {cfg.architecture} with this config needs: "
            f"{', '.join(missing[:5])}{more}"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelSpecError(
                f"{source_desc}: tensor {name} has shape {got}, the config implies {shape}"
            )
