"""Model loading: `--model` spec -> ModelSource -> ModelConfig, HF-named weights, tokenizer.

    source = resolve_model("smollm2-135m")   # alias | path/to/file.gguf | HF model directory
    cfg = load_model_config(source)
    sd = load_state_dict(source, torch.bfloat16)
    cfg, sd = load_model(source, torch.bfloat16)   # both, a GGUF header parsed once
    tok = load_tokenizer(source)
"""

from splitserve.engine.model_loader.loader import load_model, load_model_config, load_state_dict
from splitserve.engine.model_loader.names import expected_parameter_names
from splitserve.engine.model_loader.source import ModelSource, default_model_path, resolve_model
from splitserve.engine.model_loader.tokenizer import load_tokenizer

__all__ = [
    "ModelSource",
    "default_model_path",
    "expected_parameter_names",
    "load_model",
    "load_model_config",
    "load_state_dict",
    "load_tokenizer",
    "resolve_model",
]
