"""The transformers tokenizer of a ModelSource, with its chat template set.

transformers builds a GGUF file's tokenizer from the file's metadata through
`gguf.GGUFReader`, which makes a numpy view of every element of every metadata array:
~12 s for the default model's 49,152-token vocabulary and its merges on a 2-core CPU, paid
by every process that serves or tokenizes. So the tokenizer transformers built is saved
(`save_pretrained`: tokenizer.json, its config, the chat template) under
`~/.cache/splitserve/tokenizers/` (under `$XDG_CACHE_HOME` where set), keyed by the file's
path, size and modification time and transformers' version, and later loads read that
(~0.6 s once transformers is imported). Where the cache cannot be written, every load
builds from the file, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile

from splitserve.engine.cache_home import splitserve_cache
from splitserve.engine.errors import ModelSpecError
from splitserve.engine.model_loader.gguf_header import read_gguf_header
from splitserve.engine.model_loader.source import ModelSource

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def load_tokenizer(source: ModelSource):
    """A transformers tokenizer for `source`, read from local files only.

    GGUF: transformers rebuilds the tokenizer from the file's `tokenizer.ggml.*` metadata (once:
    then from the cache, see above); the chat template comes from `tokenizer.chat_template`
    when transformers did not set it.
    Directory: AutoTokenizer over the directory (tokenizer_config.json / chat_template.jinja).
    A model that ships no chat template gets none, with a warning.
    """
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            tok = _gguf_tokenizer(source.path)
        else:
            tok = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError) as e:
        if isinstance(e, ModelSpecError):
            raise
        raise ModelSpecError(f"cannot load the tokenizer of {source.path}: {e}") from e
    if not getattr(tok, "chat_template", None):
        logger.warning("%s ships no chat template; chat requests cannot be templated", source.path)
    return tok


def tokenizer_cache_dir() -> pathlib.Path:
    return splitserve_cache("tokenizers")


def _cache_entry(path: pathlib.Path) -> pathlib.Path:
    """Where the tokenizer of the GGUF file `path` is saved once built."""
    import transformers

    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0"
                         f"{transformers.__version__}".encode()).hexdigest()[:16]
    return tokenizer_cache_dir() / f"{path.stem}-{key}"


def _gguf_tokenizer(path: pathlib.Path):
    """The tokenizer transformers builds from the GGUF file `path` (with the file's chat
    template where transformers set none), from the cache when it holds it."""
    from transformers import AutoTokenizer

    try:
        entry = _cache_entry(path)
    except (OSError, RuntimeError) as e:  # no home directory to cache in: build each time
        logger.info("no tokenizer cache: %s", e)
        entry = None
    if entry is not None and (entry / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        except Exception as e:  # a damaged entry: build again below, and replace it
            logger.warning("ignoring the cached tokenizer %s: %s", entry, e)
            with contextlib.suppress(OSError):
                (entry / "tokenizer.json").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                        local_files_only=True)
    if not getattr(tok, "chat_template", None):
        template = read_gguf_header(path).metadata.get(CHAT_TEMPLATE_KEY)
        if template:
            tok.chat_template = template
    if entry is not None:
        _save(tok, entry)
    return tok


def _save(tok, entry: pathlib.Path) -> None:
    """Save `tok` as the cache entry: written whole to a temporary directory beside it, then
    renamed (a process that loses a race to write the same entry drops its copy)."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.")
        tok.save_pretrained(tmp)
        if entry.exists() and not (entry / "tokenizer.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        tmp = None
    except Exception as e:  # the cache only saves time: a failure to write it fails nothing
        if not (entry / "tokenizer.json").is_file():
            logger.info("cannot cache the tokenizer in %s: %s", entry, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
