"""Incremental detokenization: token ids in, new text out, right across multi-byte UTF-8
characters split over several tokens.

Two offsets walk the token list. `prefix_offset..read_offset` is text already emitted and
kept as context (so tokenizers that strip a leading space from the first token of a decode
agree with a full decode); each step decodes `prefix_offset..end` and emits what extends the
context, unless it ends in U+FFFD (an incomplete character: wait for the next token).
Concatenating every `add()` and the final `flush()` equals `tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request detokenizer; `add()` new ids as they arrive, `flush()` at the end."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, new_ids: Iterable[int]) -> str:
        """Append tokens; the text they complete (possibly "")."""
        self.token_ids.extend(new_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        ids = self.token_ids
        if self._read_offset >= len(ids):
            return ""
        prefix_text = (
            self._tok.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
            if self._read_offset > self._prefix_offset
            else ""
        )
        new_text = self._tok.decode(ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
            return delta
        if final:
            self._read_offset = len(ids)
        return ""
