"""The records the planner core takes and returns: `Observations` in, `Decision` out."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Observations:
    """What the serving system did over the tick interval that just ended.

    Means are None when nothing was observed (no request finished a prefill, no token was
    generated, …); the planner then keeps what it knew.
    """

    #: End of the interval (seconds; any monotonic epoch).
    timestamp: float
    #: Length of the interval (seconds).
    interval_s: float
    #: Requests per second over the interval.
    request_rate: float
    #: Mean prompt length (tokens).
    mean_isl: float | None
    #: Mean output length (tokens).
    mean_osl: float | None
    #: Mean time to first token (ms).
    mean_ttft_ms: float | None
    #: Mean inter-token latency (ms).
    mean_itl_ms: float | None
    #: Prefill replicas that exist now (starting ones included).
    prefill_replicas: int
    #: Decode replicas that exist now (starting ones included).
    decode_replicas: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.request_rate) or self.request_rate < 0:
            raise ValueError(f"request_rate must be a finite number >= 0, got {self.request_rate}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.prefill_replicas < 0 or self.decode_replicas < 0:
            raise ValueError("replica counts must be >= 0")


@dataclass(frozen=True)
class Decision:
    """What the planner wants the pools to be, and why."""

    #: The observation timestamp this decision answers.
    timestamp: float
    #: Prefill replicas to run.
    prefill_replicas: int
    #: Decode replicas to run.
    decode_replicas: int
    #: Load the sizing used (requests/s): forecast × headroom + prefill backlog.
    predicted_rps: float
    #: Multiplier the forecast got for spare capacity (fixed or adaptive headroom).
    headroom: float
    #: Forecast mean prompt length (tokens).
    predicted_isl: float
    #: Forecast mean output length (tokens).
    predicted_osl: float
    #: Prefill replicas the SLO math asked for (before limits, hysteresis and budget).
    wanted_prefill: int
    #: Decode replicas the SLO math asked for (before limits, hysteresis and budget).
    wanted_decode: int
    #: Observed ÷ modelled TTFT (smoothed, clamped).
    prefill_correction: float
    #: Observed ÷ modelled ITL (smoothed, clamped).
    decode_correction: float
    #: Both targets can be met by some pool size at the forecast load.
    feasible: bool
    #: Short human-readable account: "scale-up", "hold: hysteresis", "scale-to-zero", …
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)
