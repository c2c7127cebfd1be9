"""Request traces: arrival times, prompt and output lengths.

Synthetic traces are generated deterministically from a seed:

- `steady`: Poisson arrivals at a constant rate;
- `diurnal`: a sinusoidal rate, mean·(1 + amplitude·sin(2π t / period − π/2)), starting at
  the trough (a "day" compressed into `period_s`);
- `bursty`: the diurnal rate times bursts — bursts start as a Poisson process
  (`burst_every_s` apart on average), multiply the rate by U(burst_factor) for
  U(burst_len_s) seconds, with linear ramps of `burst_ramp_s` in and out.

Arrivals are a non-homogeneous Poisson process: Poisson counts per second of the rate,
placed uniformly inside each second. Prompt and output lengths are uniform in
mean·(1 ± spread).

A JSONL file holds one request per line: the arrival as `arrival_s` / `t` (seconds) or
`timestamp` (milliseconds, the Mooncake convention), the prompt length as `isl` /
`input_length`, the output length as `osl` / `output_length`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_KINDS = ("steady", "diurnal", "bursty")


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests sorted by arrival."""

    name: str
    #: Arrival times (s from the start), sorted.
    arrival_s: np.ndarray
    #: Prompt lengths (tokens).
    isl: np.ndarray
    #: Output lengths (tokens, >= 1; the first comes from prefill).
    osl: np.ndarray
    #: Length of the trace (s); arrivals lie in [0, duration_s).
    duration_s: float

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def window_rates(self, window_s: float) -> np.ndarray:
        """Requests per second in consecutive windows of `window_s`."""
        n = max(1, int(math.ceil(self.duration_s / window_s)))
        counts = np.bincount(np.minimum((self.arrival_s // window_s).astype(np.int64), n - 1), minlength=n)
        return counts / window_s


@dataclass(frozen=True)
class TraceSpec:
    """Parameters of a synthetic trace."""

    #: steady | diurnal | bursty.
    kind: str = "bursty"
    #: Length of the trace (s).
    duration_s: float = 7200.0
    #: Mean request rate of the steady / diurnal base (req/s); bursts add to it.
    mean_rps: float = 20.0
    #: Mean prompt length (tokens).
    isl: float = 3000.0
    #: Mean output length (tokens).
    osl: float = 200.0
    #: Prompt lengths are uniform in isl·(1 ± isl_spread).
    isl_spread: float = 0.3
    #: Output lengths are uniform in osl·(1 ± osl_spread).
    osl_spread: float = 0.5
    #: Length of one diurnal cycle (s).
    period_s: float = 3600.0
    #: Diurnal swing around the mean (0 ≤ a < 1): peak = mean·(1 + a), trough = mean·(1 − a).
    amplitude: float = 0.6
    #: Mean time between burst starts (s).
    burst_every_s: float = 900.0
    #: Range of the burst rate multiplier.
    burst_factor: tuple[float, float] = (1.3, 1.8)
    #: Range of burst lengths (s).
    burst_len_s: tuple[float, float] = (120.0, 300.0)
    #: Ramp in and out of a burst (s).
    burst_ramp_s: float = 30.0
    #: Random seed.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TRACE_KINDS:
            raise ValueError(f"trace kind must be one of {', '.join(TRACE_KINDS)}, got {self.kind!r}")
        for name in ("duration_s", "mean_rps", "isl", "osl", "period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("isl_spread", "osl_spread", "amplitude"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def rate_curve(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Request rate (req/s) for each second of the trace."""
    t = np.arange(int(math.ceil(spec.duration_s)), dtype=np.float64) + 0.5
    if spec.kind == "steady":
        return np.full(t.shape, spec.mean_rps)
    rate = spec.mean_rps * (1.0 + spec.amplitude * np.sin(2 * math.pi * t / spec.period_s - math.pi / 2))
    if spec.kind == "bursty":
        mult = np.ones_like(t)
        start = rng.exponential(spec.burst_every_s)
        while start < spec.duration_s:
            factor = rng.uniform(*spec.burst_factor)
            length = rng.uniform(*spec.burst_len_s)
            ramp = max(spec.burst_ramp_s, 1e-9)
            # trapezoid: 0 -> 1 over the ramp, flat, 1 -> 0 over the ramp
            shape = np.clip(np.minimum((t - start) / ramp, (start + length - t) / ramp), 0.0, 1.0)
            mult = np.maximum(mult, 1.0 + (factor - 1.0) * shape)
            start += length + rng.exponential(spec.burst_every_s)
        rate = rate * mult
    return rate


def _lengths(rng: np.random.Generator, n: int, mean: float, spread: float) -> np.ndarray:
    lo, hi = mean * (1.0 - spread), mean * (1.0 + spread)
    return np.maximum(1, np.rint(rng.uniform(lo, hi, n))).astype(np.int64)


def generate_trace(spec: TraceSpec) -> Trace:
    """A synthetic trace, identical for identical specs."""
    rng = np.random.default_rng(spec.seed)
    rate = rate_curve(spec, rng)
    counts = rng.poisson(rate)
    sec = np.repeat(np.arange(rate.size, dtype=np.float64), counts)
    arrivals = np.sort(sec + rng.random(sec.size))
    arrivals = arrivals[arrivals < spec.duration_s]
    n = arrivals.size
    return Trace(
        name=spec.kind,
        arrival_s=arrivals,
        isl=_lengths(rng, n, spec.isl, spec.isl_spread),
        osl=_lengths(rng, n, spec.osl, spec.osl_spread),
        duration_s=float(spec.duration_s),
    )


def _first(rec: dict, keys: tuple[str, ...], where: str) -> float:
    for k in keys:
        if k in rec:
            return float(rec[k])
    raise ValueError(f"{where}: needs one of {', '.join(keys)}")


def load_trace(path: str | Path) -> Trace:
    """Read a JSONL trace (see the module docstring for the accepted keys)."""
    p = Path(path)
    arr, isl, osl = [], [], []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from exc
            if "arrival_s" in rec or "t" in rec:
                arr.append(_first(rec, ("arrival_s", "t"), where))
            else:
                arr.append(_first(rec, ("timestamp",), where) / 1000.0)
            isl.append(max(1, int(_first(rec, ("isl", "input_length"), where))))
            osl.append(max(1, int(_first(rec, ("osl", "output_length"), where))))
    if not arr:
        raise ValueError(f"{p}: empty trace")
    a = np.asarray(arr, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    a = a[order] - a.min()
    duration = float(math.floor(a[-1]) + 1.0)
    return Trace(
        name=p.name,
        arrival_s=a,
        isl=np.asarray(isl, dtype=np.int64)[order],
        osl=np.asarray(osl, dtype=np.int64)[order],
        duration_s=duration,
    )
