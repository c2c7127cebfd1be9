"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EngineInputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    #: Most new tokens to generate (>= 1).
    max_tokens: int = 16
    #: 0 means greedy; must be >= 0.
    temperature: float = 1.0
    #: Nucleus mass in (0, 1].
    top_p: float = 1.0
    #: Keep the k most likely tokens; -1 (or 0) disables.
    top_k: int = -1
    #: Drop tokens whose probability is below min_p × the top probability; in [0, 1].
    min_p: float = 0.0
    #: Per-request RNG seed: the same seed gives the same output whatever else is batched.
    seed: int | None = None
    #: Extra token ids that end the request (finish_reason "stop"), beside the model's EOS.
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    #: Keep generating past EOS / stop tokens until max_tokens.
    ignore_eos: bool = False
    #: None: no log-probabilities; N >= 0: the chosen token's logprob plus the top N.
    logprobs: int | None = None
    #: OpenAI presence penalty in [-2, 2].
    presence_penalty: float = 0.0
    #: OpenAI frequency penalty in [-2, 2].
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EngineInputError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise EngineInputError(
                f"temperature must be >= 0, got {self.temperature}", "temperature"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise EngineInputError(f"top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if not (0.0 <= self.min_p <= 1.0):
            raise EngineInputError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise EngineInputError(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise EngineInputError(f"{name} must be in [-2, 2], got {v}", name)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
