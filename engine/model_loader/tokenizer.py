"""The transformers tokenizer of a ModelSource, with its chat template set."""

from __future__ import annotations

import logging

from splitserve.engine.errors import ModelSpecError
from splitserve.engine.model_loader.gguf_header import read_gguf_header
from splitserve.engine.model_loader.source import ModelSource

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def load_tokenizer(source: ModelSource):
    """A transformers tokenizer for `source`, read from local files only.

    GGUF: transformers rebuilds the tokenizer from the file's `tokenizer.ggml.*` metadata; the
    chat template comes from `tokenizer.chat_template` when transformers did not set it.
    Directory: AutoTokenizer over the directory (tokenizer_config.json / chat_template.jinja).
    A model that ships no chat template gets none, with a warning.
    """
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            tok = AutoTokenizer.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, local_files_only=True
            )
            if not getattr(tok, "chat_template", None):
                template = read_gguf_header(source.path).metadata.get(CHAT_TEMPLATE_KEY)
                if template:
                    tok.chat_template = template
        else:
            tok = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError) as e:
        if isinstance(e, ModelSpecError):
            raise
        raise ModelSpecError(f"cannot load the tokenizer of {source.path}: {e}") from e
    if not getattr(tok, "chat_template", None):
        logger.warning("%s ships no chat template; chat requests cannot be templated", source.path)
    return tok
