"""`PlannerConfig`: every knob of the planner core, typed, frozen, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.planner.predictors import PREDICTOR_NAMES


class PlannerConfigError(ValueError):
    """An invalid planner setting; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class PlannerConfig:
    """Planner settings. CLI flags of `splitserve planner` / `simulate` map onto these fields."""

    #: Time-to-first-token target (ms, mean per interval).
    ttft_ms: float
    #: Inter-token-latency target (ms, mean per interval).
    itl_ms: float
    #: Tick interval (s): how often observations arrive and decisions are made.
    interval_s: float = 30.0
    #: Load predictor: constant | moving-average | holt-winters | kalman.
    predictor: str = "holt-winters"
    #: Window (ticks) of the moving-average predictor.
    predictor_window: int = 10
    #: Season length (ticks) of the holt-winters predictor; 0: trend only.
    season_ticks: int = 0
    #: Forecast 1..horizon_ticks ahead and provision for the largest (covers start-up delay).
    horizon_ticks: int = 1
    #: Never size for less than the load observed over the last interval.
    follow_observed: bool = True
    #: Multiplier (>= 1) on the forecast request rate: spare capacity for surprises (the floor
    #: when the adaptive headroom below is on).
    headroom: float = 1.0
    #: Adaptive headroom: also multiply by this quantile of the recent ratios of observed to
    #: forecast rate (how much the forecast has been falling short); None: fixed `headroom`.
    headroom_quantile: float | None = 0.99
    #: Ticks of forecast errors the adaptive headroom looks back over.
    headroom_window_ticks: int = 120
    #: Cap on the adaptive headroom.
    max_headroom: float = 2.0
    #: When the observed TTFT is over target, add the implied prefill queue (rate × excess
    #: TTFT, Little's law) as extra load to be served within the next interval.
    drain_backlog: bool = True
    #: Prefill replicas while serving (scale-to-zero can go below it).
    min_prefill_replicas: int = 1
    #: Most prefill replicas; None: no limit.
    max_prefill_replicas: int | None = None
    #: Decode replicas while serving (scale-to-zero can go below it).
    min_decode_replicas: int = 1
    #: Most decode replicas; None: no limit.
    max_decode_replicas: int | None = None
    #: Total GPUs both pools may use; None: no budget. Over it, both pools shrink proportionally.
    gpu_budget: int | None = None
    #: GPUs one prefill replica uses.
    prefill_gpus_per_replica: int = 1
    #: GPUs one decode replica uses.
    decode_gpus_per_replica: int = 1
    #: Highest prefill utilisation the queueing model may plan for (0 < u < 1).
    max_prefill_utilization: float = 0.9
    #: Scale-down hysteresis: a smaller pool must be wanted on this many consecutive ticks;
    #: the pool then shrinks to the largest of those wishes. 1: shrink at once.
    scale_down_ticks: int = 3
    #: Scale both pools to zero after this many seconds without traffic; None: never.
    scale_to_zero_after_s: float | None = None
    #: A tick whose request rate is at or below this (req/s) counts as "no traffic".
    idle_rps: float = 0.0
    #: Learn correction factors from observed vs. modelled TTFT and ITL.
    use_corrections: bool = True
    #: Weight (0, 1] of the newest sample in the corrections' moving average.
    correction_smoothing: float = 0.5
    #: Lower clamp of the correction factors.
    min_correction: float = 0.5
    #: Upper clamp of the correction factors.
    max_correction: float = 4.0
    #: Prompt length (tokens) assumed until one is observed.
    default_isl: float = 1024.0
    #: Output length (tokens) assumed until one is observed.
    default_osl: float = 128.0

    def __post_init__(self) -> None:
        def positive(name: str, v: float) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PlannerConfigError(name, f"must be a positive number, got {v!r}")

        def count(name: str, v: int | None, *, minimum: int, optional: bool = False) -> None:
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise PlannerConfigError(name, f"must be an integer >= {minimum}, got {v!r}")

        positive("ttft_ms", self.ttft_ms)
        positive("itl_ms", self.itl_ms)
        positive("interval_s", self.interval_s)
        if self.predictor not in PREDICTOR_NAMES:
            raise PlannerConfigError("predictor", f"must be one of {', '.join(PREDICTOR_NAMES)}, got {self.predictor!r}")
        count("predictor_window", self.predictor_window, minimum=1)
        count("season_ticks", self.season_ticks, minimum=0)
        count("horizon_ticks", self.horizon_ticks, minimum=1)
        positive("headroom", self.headroom)
        if self.headroom < 1.0:
            raise PlannerConfigError("headroom", f"must be >= 1, got {self.headroom}")
        if self.headroom_quantile is not None and not 0.0 < self.headroom_quantile < 1.0:
            raise PlannerConfigError("headroom_quantile", f"must be in (0, 1) or None, got {self.headroom_quantile}")
        count("headroom_window_ticks", self.headroom_window_ticks, minimum=1)
        positive("max_headroom", self.max_headroom)
        if self.max_headroom < self.headroom:
            raise PlannerConfigError("max_headroom", f"must be >= headroom ({self.headroom}), got {self.max_headroom}")
        count("min_prefill_replicas", self.min_prefill_replicas, minimum=0)
        count("min_decode_replicas", self.min_decode_replicas, minimum=0)
        count("max_prefill_replicas", self.max_prefill_replicas, minimum=1, optional=True)
        count("max_decode_replicas", self.max_decode_replicas, minimum=1, optional=True)
        if self.max_prefill_replicas is not None and self.max_prefill_replicas < self.min_prefill_replicas:
            raise PlannerConfigError("max_prefill_replicas", "must be >= min_prefill_replicas")
        if self.max_decode_replicas is not None and self.max_decode_replicas < self.min_decode_replicas:
            raise PlannerConfigError("max_decode_replicas", "must be >= min_decode_replicas")
        count("prefill_gpus_per_replica", self.prefill_gpus_per_replica, minimum=1)
        count("decode_gpus_per_replica", self.decode_gpus_per_replica, minimum=1)
        count("gpu_budget", self.gpu_budget, minimum=1, optional=True)
        if self.gpu_budget is not None:
            floor = (
                self.min_prefill_replicas * self.prefill_gpus_per_replica
                + self.min_decode_replicas * self.decode_gpus_per_replica
            )
            if floor > self.gpu_budget:
                raise PlannerConfigError(
                    "gpu_budget", f"{self.gpu_budget} GPUs cannot hold the minimum pools ({floor} GPUs)"
                )
        if not 0.0 < self.max_prefill_utilization < 1.0:
            raise PlannerConfigError("max_prefill_utilization", f"must be in (0, 1), got {self.max_prefill_utilization}")
        count("scale_down_ticks", self.scale_down_ticks, minimum=1)
        if self.scale_to_zero_after_s is not None:
            positive("scale_to_zero_after_s", self.scale_to_zero_after_s)
        if not math.isfinite(self.idle_rps) or self.idle_rps < 0:
            raise PlannerConfigError("idle_rps", f"must be >= 0, got {self.idle_rps}")
        if not 0.0 < self.correction_smoothing <= 1.0:
            raise PlannerConfigError("correction_smoothing", f"must be in (0, 1], got {self.correction_smoothing}")
        positive("min_correction", self.min_correction)
        positive("max_correction", self.max_correction)
        if self.min_correction > 1.0 or self.max_correction < 1.0:
            raise PlannerConfigError("min_correction", "the range [min_correction, max_correction] must contain 1")
        positive("default_isl", self.default_isl)
        positive("default_osl", self.default_osl)
