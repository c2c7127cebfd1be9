"""Frontend configuration: typed, frozen, validated."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.frontend.disagg import DisaggConfig
from splitserve.router.config import RouterConfig


@dataclass(frozen=True)
class FrontendConfig:
    """One frontend process (`splitserve frontend`); CLI flags map onto these fields."""

    #: The `--model` spec: tokenizer and config are read from it (never the weights).
    model: str = "smollm2-135m"
    #: Names clients may put in `model`; empty: the model source's name.
    served_model_names: tuple[str, ...] = ()
    #: Address to bind.
    host: str = "127.0.0.1"
    #: HTTP port; 0 picks a free one.
    port: int = 8000
    #: Longest prompt + output; None: the smallest limit reported by the workers, else the
    #: model's max_position_embeddings.
    max_model_len: int | None = None
    #: When set, `/v1/*` requires `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    #: Discovery URL (`embedded://NAME`, `etcd://HOST:PORT/NS`) whose workers join the pool;
    #: None: only the workers given explicitly.
    discovery_url: str | None = None
    #: Seconds between Stats polls of every worker (load, KV usage, health).
    stats_interval_s: float = 1.0
    #: Retry-After seconds sent with a 503.
    retry_after_s: int = 1
    #: Most choices per request (`n`, times the number of prompts for completions).
    max_choices: int = 128
    #: When to prefill on a prefill worker (conditional disaggregation).
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    #: The KV-aware router that picks workers (frontend.routing: it follows every worker's
    #: KV events); None: the pool's least-loaded choice. The CLI always sets one (mode kv
    #: unless --router-mode says otherwise).
    router: RouterConfig | None = None
    #: HOST:PORT of a standalone router (`splitserve router`) to route through instead of
    #: an in-process one (router.remote); several frontends then share its index and load
    #: view. Unreachable: requests fail with 503 `router_unavailable`.
    router_address: str | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.stats_interval_s <= 0:
            raise ValueError(f"stats_interval_s must be > 0, got {self.stats_interval_s}")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        if self.max_choices < 1:
            raise ValueError("max_choices must be >= 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when set")
        if self.router_address is not None and ":" not in self.router_address:
            raise ValueError(f"router_address must be HOST:PORT, got {self.router_address!r}")
        object.__setattr__(self, "served_model_names", tuple(self.served_model_names))
