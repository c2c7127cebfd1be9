"""The router's configuration: one frozen, validated object; CLI flags map onto its fields."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

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
    #: Disaggregated serving: prompts whose uncached part on the chosen decode worker is at
    #: most this many tokens are prefilled there (local prefill) instead of remotely.
    max_local_prefill_tokens: int = 512
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
        if self.max_local_prefill_tokens < 0:
            raise ValueError(
                f"max_local_prefill_tokens must be >= 0, got {self.max_local_prefill_tokens!r}"
            )


def _flag(name: str) -> str:
    return "--router-" + name.replace("_", "-")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add `--router-<field>` flags (frontend and `splitserve router` share them)."""
    d = RouterConfig()
    group = parser.add_argument_group("router")
    group.add_argument(_flag("mode"), choices=MODES, default=d.mode, help="routing mode")
    group.add_argument(_flag("block_size"), type=int, default=d.block_size,
                       help="tokens per KV block (must match the workers)")
    group.add_argument(_flag("overlap_weight"), type=float, default=d.overlap_weight,
                       help="prefill-pool weight of blocks to compute vs decode blocks")
    group.add_argument(_flag("decode_overlap_weight"), type=float,
                       default=d.decode_overlap_weight,
                       help="decode-pool weight of blocks to pull (0: overlap breaks ties)")
    group.add_argument(_flag("temperature"), type=float, default=d.temperature,
                       help="0: cheapest worker; >0: softmax sampling over normalized costs")
    group.add_argument(_flag("max_active_blocks_frac"), type=float,
                       default=d.max_active_blocks_frac,
                       help="skip workers above this KV usage (1 disables)")
    group.add_argument(_flag("max_queue"), type=int, default=d.max_queue,
                       help="skip workers with this many waiting requests (default: no limit)")
    group.add_argument(_flag("retry_after_s"), type=float, default=d.retry_after_s,
                       help="Retry-After seconds when all workers are busy")
    group.add_argument(_flag("approx_ttl_s"), type=float, default=d.approx_ttl_s,
                       help="approximate mode: seconds a routed prefix is assumed cached")
    group.add_argument(_flag("max_local_prefill_tokens"), type=int,
                       default=d.max_local_prefill_tokens,
                       help="prefill on the decode worker when at most this many tokens are uncached")
    group.add_argument(_flag("seed"), type=int, default=d.seed, help="router RNG seed")


def config_from_args(args: argparse.Namespace, **overrides: object) -> RouterConfig:
    """RouterConfig from parsed `--router-*` flags (fields without a flag keep defaults)."""
    kwargs: dict[str, object] = {}
    for f in fields(RouterConfig):
        attr = "router_" + f.name
        if hasattr(args, attr):
            kwargs[f.name] = getattr(args, attr)
    kwargs.update(overrides)
    return RouterConfig(**kwargs)  # type: ignore[arg-type]
