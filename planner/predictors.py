"""Load predictors: one value per planner tick in, the value `steps` ticks ahead out.

All predictors share the small `Predictor` protocol (`update`, `predict`) and are built by
name through `make_predictor`. They are pure numpy/Python state machines (no I/O), so the
planner core stays deterministic:

- `constant`: the last observed value;
- `moving-average`: the mean of the last `window` values;
- `holt-winters`: additive Holt-Winters (level + damped trend + optional season of
  `season` ticks); during the first two seasons it runs as Holt's linear trend, then the
  trend and the season are initialised from those two seasons (classical initialisation);
- `kalman`: a local-linear-trend Kalman filter (level and slope as the hidden state).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

import numpy as np

#: Names accepted by `make_predictor` (and by `PlannerConfig.predictor`).
PREDICTOR_NAMES = ("constant", "moving-average", "holt-winters", "kalman")


class Predictor(Protocol):
    """Online one-series forecaster."""

    def update(self, value: float) -> None:
        """Record the value observed over the tick that just ended."""

    def predict(self, steps: int = 1) -> float | None:
        """Forecast `steps` ticks ahead (1 = the next tick); None before any update."""


class ConstantPredictor:
    """Predicts the last observed value."""

    def __init__(self) -> None:
        self._last: float | None = None

    def update(self, value: float) -> None:
        self._last = float(value)

    def predict(self, steps: int = 1) -> float | None:
        return self._last


class MovingAveragePredictor:
    """Predicts the mean of the last `window` values."""

    def __init__(self, window: int = 10) -> None:
        if window < 1:
            raise ValueError(f"moving-average window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self._values.append(float(value))

    def predict(self, steps: int = 1) -> float | None:
        if not self._values:
            return None
        return float(sum(self._values) / len(self._values))


class HoltWintersPredictor:
    """Additive Holt-Winters with a damped trend and an optional season of `season` ticks.

    alpha, beta, gamma: smoothing of level, trend and season (0 < x <= 1); phi: trend
    damping per step (1 = undamped). `season` < 2 disables the seasonal component.
    """

    def __init__(
        self,
        season: int = 0,
        alpha: float = 0.5,
        beta: float = 0.15,
        gamma: float = 0.3,
        phi: float = 0.98,
    ) -> None:
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("phi", phi)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"holt-winters {name} must be in (0, 1], got {v}")
        if season < 0:
            raise ValueError(f"holt-winters season must be >= 0, got {season}")
        self.season = int(season) if season >= 2 else 0
        self.alpha, self.beta, self.gamma, self.phi = alpha, beta, gamma, phi
        self._n = 0
        self._level = 0.0
        self._trend = 0.0
        self._seasonal: np.ndarray | None = None
        self._first: list[float] = []

    def update(self, value: float) -> None:
        y = float(value)
        n = self._n
        if n == 0:
            self._level, self._trend = y, 0.0
        elif self._seasonal is None:
            prev = self._level
            self._level = self.alpha * y + (1 - self.alpha) * (prev + self.phi * self._trend)
            self._trend = self.beta * (self._level - prev) + (1 - self.beta) * self.phi * self._trend
        else:
            m = self.season
            s = self._seasonal[n % m]
            prev = self._level
            self._level = self.alpha * (y - s) + (1 - self.alpha) * (prev + self.phi * self._trend)
            self._trend = self.beta * (self._level - prev) + (1 - self.beta) * self.phi * self._trend
            self._seasonal[n % m] = self.gamma * (y - self._level) + (1 - self.gamma) * s
        if self.season and self._seasonal is None:
            self._first.append(y)
            if len(self._first) == 2 * self.season:
                self._init_season()
        self._n = n + 1

    def _init_season(self) -> None:
        # Classical initialisation from two seasons: the trend is the mean season-over-season
        # change, the seasonal indices the detrended deviations averaged over both seasons.
        m = self.season
        y = np.asarray(self._first)
        trend = float(np.mean(y[m:] - y[:m]) / m)
        mid = (m - 1) / 2.0
        level0 = float(y[:m].mean())
        t = np.arange(2 * m, dtype=np.float64)
        resid = y - (level0 + trend * (t - mid))
        self._seasonal = 0.5 * (resid[:m] + resid[m:])
        self._seasonal -= self._seasonal.mean()
        self._level = level0 + trend * (2 * m - 1 - mid)
        self._trend = trend
        self._first = []

    def predict(self, steps: int = 1) -> float | None:
        if self._n == 0:
            return None
        steps = max(1, int(steps))
        damp = sum(self.phi**k for k in range(1, steps + 1))
        out = self._level + damp * self._trend
        if self._seasonal is not None:
            out += float(self._seasonal[(self._n + steps - 1) % self.season])
        return float(out)


class KalmanTrendPredictor:
    """Local-linear-trend Kalman filter: state (level, slope), observation = level + noise.

    `level_noise` and `slope_noise` are the process-noise variances relative to the
    observation noise (only the ratios matter); larger values follow changes faster.
    """

    def __init__(self, level_noise: float = 0.1, slope_noise: float = 0.01) -> None:
        if level_noise <= 0 or slope_noise <= 0:
            raise ValueError("kalman noise ratios must be > 0")
        self._q = np.diag([level_noise, slope_noise])
        self._f = np.array([[1.0, 1.0], [0.0, 1.0]])
        self._x: np.ndarray | None = None
        self._p = np.eye(2)

    def update(self, value: float) -> None:
        y = float(value)
        if self._x is None:
            self._x = np.array([y, 0.0])
            self._p = np.diag([1.0, 1.0])
            return
        x = self._f @ self._x
        p = self._f @ self._p @ self._f.T + self._q
        s = p[0, 0] + 1.0  # observation noise variance 1 (the scale cancels out)
        k = p[:, 0] / s
        self._x = x + k * (y - x[0])
        self._p = p - np.outer(k, p[0, :])

    def predict(self, steps: int = 1) -> float | None:
        if self._x is None:
            return None
        steps = max(1, int(steps))
        return float(self._x[0] + steps * self._x[1])


def make_predictor(name: str, *, window: int = 10, season: int = 0) -> Predictor:
    """Build a predictor by name (one of PREDICTOR_NAMES)."""
    factories: dict[str, Callable[[], Predictor]] = {
        "constant": ConstantPredictor,
        "moving-average": lambda: MovingAveragePredictor(window),
        "holt-winters": lambda: HoltWintersPredictor(season=season),
        "kalman": KalmanTrendPredictor,
    }
    try:
        return factories[name]()
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTOR_NAMES)}") from None
