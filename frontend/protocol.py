"""OpenAI request schemas (pydantic). Unknown fields are refused (400 naming the field), and
fields we know but do not implement are refused by `check_unsupported`, never ignored.

Beside OpenAI's fields we accept vLLM's common extensions: top_k, min_p, ignore_eos,
stop_token_ids.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitserve.frontend.errors import invalid, unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    #: A string, or a list of parts of which only {"type": "text", "text": ...} is supported.
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part type {kind!r} is not supported (only 'text')")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
                extra = set(part) - {"type", "text"}
                if extra:
                    raise ValueError(f"unknown content part fields: {sorted(extra)}")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def common_checks(self) -> None:
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Known OpenAI fields we do not implement: refused by check_unsupported when used.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        self.common_checks()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, "tool calling is not implemented")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool calling is not implemented")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "tool calling is not implemented")
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind != "text":
                raise unsupported(
                    "response_format", f"type {kind!r}: structured output is not implemented"
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def check_unsupported(self) -> None:
        self.common_checks()
        if self.echo:
            raise unsupported("echo")
        if self.suffix:
            raise unsupported("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of must equal n")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise invalid("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]

