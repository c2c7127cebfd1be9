"""The router's configuration: one frozen, validated object; the `--router-*` flags
(`frontend/routing.py`: add_router_args, router_config_from_args) map onto its fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Routing modes (`--router-mode`).
MODES = ("kv", "round-robin", "random", "least-loaded")


@dataclass(frozen=True)
class RouterConfig:
    """How the router picks prefill and decode workers."""

    #: kv (prefix overlap + load cost) | round-robin | random | least-loaded (load only).
    mode: str = "kv"
    #: Tokens per KV block; must equal every worker's engine block size (checked at subscribe).
    block_size: int = 16
    #: Prefill pool and aggregated (local-prefill) choice: weight of the prompt blocks the
    #: worker would have to compute (uncached blocks + prefill already queued there) against
    #: its active decode blocks. cost = overlap_weight * prefill_blocks + active_blocks +
    #: new_blocks (the prompt blocks not cached there; see router/policy.py).
    overlap_weight: float = 1.0
    #: Decode pool (remote prefill) choice: weight of the blocks the decode worker would have
    #: to pull. 0 makes load decide alone, with prefix overlap breaking ties.
    decode_overlap_weight: float = 0.0
    #: 0 picks the cheapest worker; > 0 samples a softmax over costs normalized to [0, 1]
    #: (higher spreads load more).
    temperature: float = 0.0
    #: Skip workers whose active KV blocks exceed this fraction of their pool (1 disables).
    max_active_blocks_frac: float = 0.95
    #: Skip workers with this many requests waiting for their first token; None: no limit.
    max_queue: int | None = None
    #: Retry-After (seconds) suggested to clients when every worker is busy.
    retry_after_s: float = 1.0
    #: Approximate mode (workers that publish no KV events): how long the router assumes a
    #: worker keeps the prefix of a request it routed there.
    approx_ttl_s: float = 120.0
    #: Approximate mode: most blocks remembered per worker when its pool size is unknown.
    approx_max_blocks: int = 1 << 18
    #: Worker Stats older than this are ignored when reconciling the load view.
    stats_ttl_s: float = 10.0
    #: A routed request with no completion after this long is dropped from the load view.
    request_timeout_s: float = 600.0
    #: Batches buffered per worker while it resyncs from a snapshot (beyond that: dropped,
    #: and a later gap asks for another snapshot).
    resync_buffer_batches: int = 1024
    #: Seed of the router's own RNG (random mode, temperature sampling); None: unseeded.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {'|'.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        for name in ("overlap_weight", "decode_overlap_weight", "temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (0.0 < self.max_active_blocks_frac <= 1.0):
            raise ValueError(
                f"max_active_blocks_frac must be in (0, 1], got {self.max_active_blocks_frac!r}"
            )
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {self.max_queue!r}")
        for name in ("retry_after_s", "approx_ttl_s", "stats_ttl_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.approx_max_blocks < 1:
            raise ValueError(f"approx_max_blocks must be >= 1, got {self.approx_max_blocks!r}")
        if self.resync_buffer_batches < 0:
            raise ValueError(
                f"resync_buffer_batches must be >= 0, got {self.resync_buffer_batches!r}"
            )
