"""The frontend's view of the tokenizer: encode, chat templates, per-token text and bytes.

Wraps a transformers tokenizer (from `splitserve.engine.model_loader.load_tokenizer`); the
per-token caches live on the instance, so one instance per app.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Text <-> token ids for the frontend (no model weights)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_ids = tuple(eos_token_ids) or (
            (hf_tokenizer.eos_token_id,) if hf_tokenizer.eos_token_id is not None else ()
        )
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._byte_decoder = _byte_level_decoder() if self._is_byte_level() else None

    def _is_byte_level(self) -> bool:
        try:
            spec = json.loads(self.hf.backend_tokenizer.to_str())
        except Exception:  # noqa: BLE001 - slow tokenizers have no backend
            return False
        dec = spec.get("decoder") or {}
        kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
        return "ByteLevel" in kinds

    # -- encode ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` (text, not yet tokenized)."""
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template already writes any BOS it wants; do not add another.
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    # -- decode ------------------------------------------------------------------------
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(
            token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI logprobs show it (U+FFFD for a partial UTF-8 char)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.hf.decode([token_id], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes one token stands for (may be part of a character)."""
        data = self._token_bytes.get(token_id)
        if data is None:
            data = self._raw_bytes(token_id)
            self._token_bytes[token_id] = data
        return data

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            m = _BYTE_TOKEN.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if self._byte_decoder is not None and token_id not in self.hf.all_special_ids:
                try:
                    return bytes(self._byte_decoder[c] for c in piece)
                except KeyError:
                    pass
        return self.token_text(token_id).encode("utf-8")


def load_frontend_tokenizer(model_spec: str) -> tuple[Tokenizer, str, int]:
    """(Tokenizer, default served name, the model's context limit) for `--model`.

    Reads the tokenizer and the model config only; never the weights.
    """
    from splitserve.engine.model_loader import load_model_config, load_tokenizer, resolve_model

    source = resolve_model(model_spec)
    cfg = load_model_config(source)
    tok = Tokenizer(load_tokenizer(source), eos_token_ids=tuple(cfg.eos_token_ids))
    return tok, source.name, int(cfg.max_position_embeddings)
