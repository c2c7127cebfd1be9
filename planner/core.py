"""The planner core: `Planner.on_tick(observations) -> Decision`, pure (no I/O, no clock).

One tick:
1. corrections: compare the observed TTFT / ITL with what the profile and the queueing
   model predict at the observed load and current pool sizes; smooth, step-limit and
   clamp the ratio (prefill only learns in calm intervals: a burst's backlog is not a
   profile error);
2. predictors: feed the request rate, ISL and OSL; forecast 1..horizon ticks ahead and
   take the largest forecast (never below the observed rate when `follow_observed`);
3. headroom: multiply by `headroom`, or by the recent `headroom_quantile` of observed ÷
   forecast rate if larger (the forecast's own record of falling short); when the observed
   TTFT is over target add the implied prefill queue as extra load (`drain_backlog`);
4. SLO math (`sla_math.size_pools`): the pool sizes that load needs under the targets
   divided by the corrections;
5. limits: min/max replicas; scale-to-zero after `scale_to_zero_after_s` without traffic
   (and straight back up, bypassing hysteresis, when traffic returns);
6. hysteresis: scale up at once, scale down only after `scale_down_ticks` consecutive
   ticks wanting less, to the largest of those wishes;
7. GPU budget: over it, both pools shrink proportionally (`sla_math.fit_budget`).

The same object runs live (`splitserve planner`), in the simulator and in tests.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from splitserve.planner.config import PlannerConfig
from splitserve.planner.predictors import Predictor, make_predictor
from splitserve.planner.profile import Profile
from splitserve.planner.sla_math import (
    decode_context,
    fit_budget,
    mdc_wait_ms,
    prefill_capacity,
    size_pools,
)
from splitserve.planner.types import Decision, Observations

#: Corrections are only learned below this prefill utilisation: near saturation the
#: queueing model's error swamps the profile's.
_CORRECTION_MAX_UTILIZATION = 0.85
#: Forecast errors the adaptive headroom needs before it is used.
_MIN_HEADROOM_SAMPLES = 10
#: Largest factor one tick may change a correction by.
_CORRECTION_MAX_STEP = 1.25


class Planner:
    """Sizes the prefill and decode pools from SLO targets, a profile and observations."""

    def __init__(self, config: PlannerConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        mk = lambda: make_predictor(  # noqa: E731
            config.predictor, window=config.predictor_window, season=config.season_ticks
        )
        self._rate: Predictor = mk()
        self._isl: Predictor = mk()
        self._osl: Predictor = mk()
        self._last_isl: float | None = None
        self._last_osl: float | None = None
        self.prefill_correction = 1.0
        self.decode_correction = 1.0
        self._idle_since: float | None = None
        self._calm = True
        self._last_forecast: float | None = None
        self._ratios: deque[float] = deque(maxlen=config.headroom_window_ticks)
        self._last_forecast: float | None = None
        self._ratios: deque[float] = deque(maxlen=config.headroom_window_ticks)
        self._down_wishes: dict[str, list[int]] = {"prefill": [], "decode": []}

    # ------------------------------------------------------------------ helpers
    def _smooth(self, old: float, sample: float) -> float:
        cfg = self.config
        # One tick moves a correction by at most x/÷ _CORRECTION_MAX_STEP: a single odd interval
        # (a burst's backlog draining) cannot swing the pools.
        sample = min(old * _CORRECTION_MAX_STEP, max(old / _CORRECTION_MAX_STEP, sample))
        new = cfg.correction_smoothing * sample + (1.0 - cfg.correction_smoothing) * old
        return min(cfg.max_correction, max(cfg.min_correction, new))

    def _update_corrections(self, obs: Observations, isl: float, osl: float) -> None:
        rate = obs.request_rate
        calm_before = self._calm
        self._calm = False
        if rate <= 0:
            self._calm = True
            return
        if obs.mean_ttft_ms is not None and obs.mean_ttft_ms > 0 and obs.prefill_replicas > 0:
            cap = prefill_capacity(self.profile, isl, self.config.ttft_ms)
            util = rate * isl / (obs.prefill_replicas * cap.raw_tok_s)
            self._calm = util < _CORRECTION_MAX_UTILIZATION
            if self._calm and calm_before:
                expected = cap.idle_ttft_ms + mdc_wait_ms(cap.service_ms, obs.prefill_replicas, util)
                self.prefill_correction = self._smooth(self.prefill_correction, obs.mean_ttft_ms / expected)
        if obs.mean_itl_ms is not None and obs.mean_itl_ms > 0 and obs.decode_replicas > 0:
            ctx = decode_context(isl, osl)
            # Little's law: requests decoding at once per replica.
            batch = max(1.0, rate * osl * obs.mean_itl_ms / 1000.0 / obs.decode_replicas)
            batch = min(batch, float(max(1, self.profile.max_decode_batch_for_context(ctx))))
            expected = float(self.profile.decode_itl_ms(batch, ctx))
            if math.isfinite(expected) and expected > 0:
                self.decode_correction = self._smooth(self.decode_correction, obs.mean_itl_ms / expected)

    def _headroom(self, rate: float) -> float:
        """`headroom`, raised to the recent `headroom_quantile` of observed ÷ forecast rate."""
        cfg = self.config
        last = self._last_forecast
        if last is not None and last > 0 and rate > cfg.idle_rps:
            self._ratios.append(rate / last)
        if cfg.headroom_quantile is None or len(self._ratios) < _MIN_HEADROOM_SAMPLES:
            return cfg.headroom
        q = float(np.quantile(np.fromiter(self._ratios, dtype=np.float64), cfg.headroom_quantile))
        return min(cfg.max_headroom, max(cfg.headroom, q))

    def _backlog_rps(self, obs: Observations, isl: float) -> float:
        """Extra req/s that serves the prefill queue implied by an over-target TTFT in one interval."""
        if obs.mean_ttft_ms is None or obs.mean_ttft_ms <= self.config.ttft_ms or obs.request_rate <= 0:
            return 0.0
        idle = float(self.profile.prefill_ttft_ms(isl))
        queued = obs.request_rate * max(0.0, obs.mean_ttft_ms - idle) / 1000.0  # Little's law
        return queued / obs.interval_s

    def _forecast(self, pred: Predictor, fallback: float) -> float:
        values = [pred.predict(h) for h in range(1, self.config.horizon_ticks + 1)]
        values = [v for v in values if v is not None and math.isfinite(v)]
        return max(values) if values else fallback

    def _hysteresis(self, pool: str, want: int, current: int) -> tuple[int, bool]:
        wishes = self._down_wishes[pool]
        if want >= current:
            wishes.clear()
            return want, False
        wishes.append(want)
        n = self.config.scale_down_ticks
        if len(wishes) >= n:
            new = max(wishes[-n:])
            wishes.clear()
            return new, False
        return current, True

    # ------------------------------------------------------------------ the tick
    def on_tick(self, obs: Observations) -> Decision:
        """Decide the pool sizes for the next interval from what the last one showed."""
        cfg = self.config
        rate = obs.request_rate
        if obs.mean_isl is not None and obs.mean_isl > 0:
            self._last_isl = float(obs.mean_isl)
        if obs.mean_osl is not None and obs.mean_osl > 0:
            self._last_osl = float(obs.mean_osl)
        isl_now = self._last_isl if self._last_isl is not None else cfg.default_isl
        osl_now = self._last_osl if self._last_osl is not None else cfg.default_osl

        if cfg.use_corrections:
            self._update_corrections(obs, isl_now, osl_now)

        self._rate.update(rate)
        if obs.mean_isl is not None and obs.mean_isl > 0:
            self._isl.update(obs.mean_isl)
        if obs.mean_osl is not None and obs.mean_osl > 0:
            self._osl.update(obs.mean_osl)

        idle = rate <= cfg.idle_rps
        waking = not idle and obs.prefill_replicas + obs.decode_replicas == 0
        pred_rate = max(0.0, self._forecast(self._rate, rate))
        if cfg.follow_observed or waking:
            pred_rate = max(pred_rate, rate)
        headroom = self._headroom(rate)
        self._last_forecast = pred_rate
        pred_rate *= headroom
        backlog = self._backlog_rps(obs, isl_now) if cfg.drain_backlog else 0.0
        pred_rate += backlog
        pred_isl = max(1.0, self._forecast(self._isl, isl_now))
        pred_osl = max(1.0, self._forecast(self._osl, osl_now))

        plan = size_pools(
            self.profile,
            rps=pred_rate,
            isl=pred_isl,
            osl=pred_osl,
            ttft_ms=cfg.ttft_ms,
            itl_ms=cfg.itl_ms,
            prefill_correction=self.prefill_correction,
            decode_correction=self.decode_correction,
            max_prefill_utilization=cfg.max_prefill_utilization,
        )
        want_p, want_d = plan.prefill_replicas, plan.decode_replicas

        if idle:
            if self._idle_since is None:
                self._idle_since = obs.timestamp - obs.interval_s
        else:
            self._idle_since = None
        zero = (
            cfg.scale_to_zero_after_s is not None
            and self._idle_since is not None
            and obs.timestamp - self._idle_since >= cfg.scale_to_zero_after_s - 1e-9
        )

        reasons: list[str] = []
        if zero:
            new_p = new_d = 0
            self._down_wishes["prefill"].clear()
            self._down_wishes["decode"].clear()
            reasons.append("scale-to-zero")
        else:
            lim_p = max(cfg.min_prefill_replicas, want_p)
            lim_d = max(cfg.min_decode_replicas, want_d)
            if cfg.max_prefill_replicas is not None:
                lim_p = min(lim_p, cfg.max_prefill_replicas)
            if cfg.max_decode_replicas is not None:
                lim_d = min(lim_d, cfg.max_decode_replicas)
            if waking:
                new_p, new_d = lim_p, lim_d
                self._down_wishes["prefill"].clear()
                self._down_wishes["decode"].clear()
                reasons.append("wake")
            else:
                new_p, held_p = self._hysteresis("prefill", lim_p, obs.prefill_replicas)
                new_d, held_d = self._hysteresis("decode", lim_d, obs.decode_replicas)
                if held_p or held_d:
                    reasons.append("hold: scale-down hysteresis")
            fitted = fit_budget(
                new_p,
                new_d,
                cfg.gpu_budget,
                prefill_gpus=cfg.prefill_gpus_per_replica,
                decode_gpus=cfg.decode_gpus_per_replica,
                min_prefill=min(cfg.min_prefill_replicas, new_p),
                min_decode=min(cfg.min_decode_replicas, new_d),
            )
            if fitted != (new_p, new_d):
                reasons.append("budget")
                new_p, new_d = fitted
        if not plan.feasible:
            reasons.append("infeasible: targets unreachable at forecast ISL/OSL, best effort")
        if not reasons:
            if (new_p, new_d) == (obs.prefill_replicas, obs.decode_replicas):
                reasons.append("steady")
            elif new_p >= obs.prefill_replicas and new_d >= obs.decode_replicas:
                reasons.append("scale-up")
            elif new_p <= obs.prefill_replicas and new_d <= obs.decode_replicas:
                reasons.append("scale-down")
            else:
                reasons.append("rebalance")
        return Decision(
            timestamp=obs.timestamp,
            prefill_replicas=int(new_p),
            decode_replicas=int(new_d),
            predicted_rps=float(pred_rate),
            headroom=float(headroom),
            predicted_isl=float(pred_isl),
            predicted_osl=float(pred_osl),
            wanted_prefill=int(want_p),
            wanted_decode=int(want_d),
            prefill_correction=float(self.prefill_correction),
            decode_correction=float(self.decode_correction),
            feasible=bool(plan.feasible),
            reason="; ".join(reasons),
        )
