"""Load predictors."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.planner.predictors import (
    PREDICTOR_NAMES,
    ConstantPredictor,
    HoltWintersPredictor,
    KalmanTrendPredictor,
    MovingAveragePredictor,
    make_predictor,
)


def one_step_mae(pred, series, warmup):
    errs = []
    for i, y in enumerate(series):
        if i >= warmup:
            errs.append(abs(pred.predict(1) - y))
        pred.update(y)
    return float(np.mean(errs))


def sine_trend(n=480, season=48, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + 0.2 * t + 30 * np.sin(2 * np.pi * t / season) + rng.normal(0, noise, n)


def test_nothing_before_first_update():
    for name in PREDICTOR_NAMES:
        assert make_predictor(name, season=4).predict() is None


def test_constant_and_moving_average():
    c, m = ConstantPredictor(), MovingAveragePredictor(window=3)
    for v in (1.0, 2.0, 6.0, 10.0):
        c.update(v)
        m.update(v)
    assert c.predict() == 10.0
    assert m.predict() == pytest.approx((2 + 6 + 10) / 3)
    with pytest.raises(ValueError):
        MovingAveragePredictor(window=0)


def test_seasonal_trend_tracks_sine_plus_trend_better_than_constant_and_average():
    season = 48
    y = sine_trend(season=season)
    hw = one_step_mae(HoltWintersPredictor(season=season), y, warmup=2 * season)
    const = one_step_mae(ConstantPredictor(), y, warmup=2 * season)
    avg = one_step_mae(MovingAveragePredictor(window=10), y, warmup=2 * season)
    assert hw < 0.8 * const
    assert hw < 0.5 * avg


def test_seasonal_forecast_several_steps_ahead():
    season = 24
    t = np.arange(season * 6)
    y = 50 + 0.5 * t + 10 * np.sin(2 * np.pi * t / season)
    hw = HoltWintersPredictor(season=season)
    for v in y:
        hw.update(v)
    n = len(y)
    for h in (1, 6, 12):
        truth = 50 + 0.5 * (n + h - 1) + 10 * np.sin(2 * np.pi * (n + h - 1) / season)
        assert hw.predict(h) == pytest.approx(truth, abs=2.5)
    # a constant predictor is off by the seasonal swing and the trend
    assert abs(y[-1] - (50 + 0.5 * (n + 5) + 10 * np.sin(2 * np.pi * (n + 5) / season))) > 5


def test_holt_without_season_follows_a_ramp():
    hw = HoltWintersPredictor(season=0, phi=1.0)
    for t in range(100):
        hw.update(3.0 * t)
    assert hw.predict(1) == pytest.approx(300.0, abs=1.0)
    assert hw.predict(10) == pytest.approx(327.0, abs=3.0)


def test_kalman_follows_a_ramp_and_beats_constant_ahead():
    k = KalmanTrendPredictor()
    c = ConstantPredictor()
    rng = np.random.default_rng(1)
    for t in range(200):
        v = 2.0 * t + rng.normal(0, 1.0)
        k.update(v)
        c.update(v)
    truth = 2.0 * 204
    assert abs(k.predict(5) - truth) < 3.0
    assert abs(c.predict(5) - truth) > 7.0


def test_make_predictor_and_errors():
    assert isinstance(make_predictor("moving-average", window=4), MovingAveragePredictor)
    assert isinstance(make_predictor("holt-winters", season=12), HoltWintersPredictor)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("arima")
    with pytest.raises(ValueError):
        HoltWintersPredictor(alpha=0.0)
    with pytest.raises(ValueError):
        KalmanTrendPredictor(level_noise=0.0)
