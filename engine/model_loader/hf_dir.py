"""Hugging Face model directories: config.json -> ModelConfig, *.safetensors -> state dict."""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from typing import Any

import torch
from tqdm import tqdm

from splitserve.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from splitserve.engine.errors import ModelSpecError
from splitserve.engine.model_loader.names import check_complete, expected_shapes

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

#: config.json `model_type` -> architecture, for configs without `architectures`.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} does not hold a JSON object")
    return data


def architecture_of(config: dict[str, Any]) -> str:
    """The architecture a config.json declares (`architectures[0]`, else from `model_type`)."""
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = config.get("model_type")
    return _MODEL_TYPES.get(model_type, f"<model_type {model_type!r}>")


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of `directory`: those the index names, else every *.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSpecError(f"{index} has no weight_map")
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def _eos_ids(*values: Any) -> tuple[int, ...]:
    """Merge eos_token_id values (int, list of ints or None), keeping first-seen order."""
    ids: list[int] = []
    for v in values:
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the legacy keys or transformers 5's rope_parameters."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:  # pre-4.45 spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def config_from_dir(directory: pathlib.Path) -> ModelConfig:
    """ModelConfig from `directory`/config.json (+ generation_config.json's eos ids)."""
    config = read_json(directory / "config.json")
    arch = architecture_of(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelSpecError(
            f"{directory}/config.json declares architecture {arch!r}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ModelSpecError(f"{directory}/config.json lacks {key!r}")
        return config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = config.get("head_dim") or hidden // heads
    # Qwen2 always has q/k/v biases (and none on o_proj); elsewhere `attention_bias` also puts
    # one on o_proj, which the model code does not carry.
    if arch == "Qwen2ForCausalLM":
        attention_bias = True
    elif config.get("attention_bias"):
        raise ModelSpecError(f"{directory}: attention_bias=True on {arch} is not supported")
    else:
        attention_bias = False
    if config.get("mlp_bias"):
        raise ModelSpecError(f"{directory}: mlp_bias=True is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelSpecError(f"{directory}: hidden_act {config['hidden_act']!r} is not supported")
    if config.get("sliding_window") and (arch == "MistralForCausalLM" or config.get("use_sliding_window")):
        logger.warning("%s: sliding_window=%s is ignored (full attention)", directory, config["sliding_window"])

    tie = config.get("tie_word_embeddings")
    if tie is None:  # every supported config class defaults to False
        tie = False
    gen_eos = None
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        gen_eos = read_json(gen_path).get("eos_token_id")
    theta, scaling = _rope(config)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(tie),
        attention_bias=attention_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config.get("eos_token_id"), gen_eos),
    )


def state_dict_from_dir(
    directory: pathlib.Path, cfg: ModelConfig, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    """Read every expected tensor from the safetensors files, one at a time, cast to `dtype`."""
    from safetensors import safe_open

    expected = expected_shapes(cfg)
    files = safetensors_files(directory)
    if not files:
        raise ModelSpecError(f"{directory} holds no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = []
        for path in files:
            if not path.is_file():
                raise ModelSpecError(f"{directory}/{INDEX_FILE} names {path.name}, which is missing")
            handles.append(stack.enter_context(safe_open(str(path), framework="pt")))
        total = sum(len(h.keys()) for h in handles)
        bar = stack.enter_context(
            tqdm(total=total, desc=f"Loading {directory.name}", unit="tensor", disable=not progress)
        )
        for handle in handles:
            for name in handle.keys():
                bar.update(1)
                if name not in expected:
                    # a tied lm_head stored anyway, rotary inv_freq buffers, ...
                    if name != "lm_head.weight" and not name.endswith("rotary_emb.inv_freq"):
                        logger.warning("%s: ignoring unexpected tensor %s", directory, name)
                    continue
                out[name] = handle.get_tensor(name).to(dtype).contiguous()
    check_complete(str(directory), cfg, out, expected)
    return {name: out[name] for name in expected}
