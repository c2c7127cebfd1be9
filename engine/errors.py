"""Errors the engine raises for bad input; each names the offending parameter."""

from __future__ import annotations


class EngineInputError(ValueError):
    """A request the engine refuses; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelSpecError(ValueError):
    """`--model` names something we cannot load."""
