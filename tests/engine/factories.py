"""Small factories for engine tests: tiny random-weight Llama models and engines."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.engine import Engine


def tiny_model_config(**over) -> ModelConfig:
    base = dict(
        architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    )
    base.update(over)
    return ModelConfig(**base)


def hf_tiny_model(cfg: ModelConfig, seed: int = 0):
    """A transformers model with random weights matching `cfg` (the reference)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids), rope_scaling=cfg.rope_scaling,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # Larger weights than the default init give peaked logits: fewer greedy near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hf_tiny_model(cfg, seed).state_dict().items()}


def tiny_engine(cfg: ModelConfig | None = None, seed: int = 0, **engine_over) -> Engine:
    cfg = cfg or tiny_model_config()
    opts = dict(model="tiny", dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
                max_num_batched_tokens=64, max_num_seqs=8, progress=False)
    opts.update(engine_over)
    return Engine(EngineConfig(**opts), model_config=cfg, state_dict=random_state_dict(cfg, seed))


def built_kernel(kernels: dict, name: str, what: str) -> tuple:
    """kernels[name] (a tuple whose first item is a native kernel, or None where it is not
    built), or skip the test when that kernel is not built here."""
    if kernels[name][0] is None:
        pytest.skip(f"the {name} {what} is not built here (no C compiler, or not the "
                    f"instructions it needs)")
    return kernels[name]
