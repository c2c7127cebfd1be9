"""Observations from the frontend's Prometheus metrics (`GET /metrics`).

The frontend exports (names shared with `frontend/`):

- `splitserve_requests_total{status=...}`  counter, one per finished request;
- `splitserve_time_to_first_token_seconds` histogram;
- `splitserve_inter_token_latency_seconds` histogram;
- `splitserve_input_tokens`                histogram (prompt tokens per request);
- `splitserve_output_tokens`               histogram (generated tokens per request).

Counters and histograms are cumulative, so one tick's observations are *differences*
between two scrapes: the request rate is Δcount ÷ Δt, each mean is Δsum ÷ Δcount of its
histogram (None when Δcount is 0). A counter that went backwards (the frontend restarted)
counts from zero. Labels are summed over; several frontends are summed too.

`parse_metrics` and `observations_between` are pure; `PrometheusObserver` adds the HTTP
fetch and remembers the previous scrape.
"""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import dataclass
from typing import Callable, Sequence

from splitserve.planner.types import Observations

log = logging.getLogger(__name__)

REQUESTS_TOTAL = "splitserve_requests_total"
TTFT_SECONDS = "splitserve_time_to_first_token_seconds"
ITL_SECONDS = "splitserve_inter_token_latency_seconds"
INPUT_TOKENS = "splitserve_input_tokens"
OUTPUT_TOKENS = "splitserve_output_tokens"
_HISTOGRAMS = (TTFT_SECONDS, ITL_SECONDS, INPUT_TOKENS, OUTPUT_TOKENS)


@dataclass(frozen=True)
class MetricsSnapshot:
    """The cumulative values the planner needs from one scrape (summed over labels)."""

    #: splitserve_requests_total over all statuses.
    requests_total: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0
    isl_sum: float = 0.0
    isl_count: float = 0.0
    osl_sum: float = 0.0
    osl_count: float = 0.0

    def __add__(self, other: "MetricsSnapshot") -> "MetricsSnapshot":
        return MetricsSnapshot(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)  # type: ignore[arg-type]
        )


_FIELDS = {
    TTFT_SECONDS: ("ttft_sum_s", "ttft_count"),
    ITL_SECONDS: ("itl_sum_s", "itl_count"),
    INPUT_TOKENS: ("isl_sum", "isl_count"),
    OUTPUT_TOKENS: ("osl_sum", "osl_count"),
}


def parse_metrics(text: str) -> MetricsSnapshot:
    """Pick the planner's metrics out of Prometheus text exposition format."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {f: 0.0 for f in MetricsSnapshot.__dataclass_fields__}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == REQUESTS_TOTAL:
                values["requests_total"] += float(sample.value)
                continue
            for hist, (sum_field, count_field) in _FIELDS.items():
                if name == hist + "_sum":
                    values[sum_field] += float(sample.value)
                elif name == hist + "_count":
                    values[count_field] += float(sample.value)
    return MetricsSnapshot(**values)


def _delta(cur: float, prev: float) -> float:
    return cur - prev if cur >= prev else cur  # reset: the process restarted from zero


def _mean(dsum: float, dcount: float, scale: float = 1.0) -> float | None:
    return dsum / dcount * scale if dcount > 0 else None


def observations_between(
    prev: MetricsSnapshot,
    cur: MetricsSnapshot,
    *,
    interval_s: float,
    timestamp: float,
    prefill_replicas: int,
    decode_replicas: int,
) -> Observations:
    """One tick's observations from two cumulative snapshots `interval_s` apart."""
    reset = cur.requests_total < prev.requests_total
    base = MetricsSnapshot() if reset else prev

    def d(field: str) -> float:
        return _delta(getattr(cur, field), getattr(base, field))

    return Observations(
        timestamp=timestamp,
        interval_s=interval_s,
        request_rate=max(0.0, d("requests_total")) / interval_s,
        mean_isl=_mean(d("isl_sum"), d("isl_count")),
        mean_osl=_mean(d("osl_sum"), d("osl_count")),
        mean_ttft_ms=_mean(d("ttft_sum_s"), d("ttft_count"), 1000.0),
        mean_itl_ms=_mean(d("itl_sum_s"), d("itl_count"), 1000.0),
        prefill_replicas=prefill_replicas,
        decode_replicas=decode_replicas,
    )


def fetch_metrics_text(url: str, timeout_s: float = 5.0) -> str:
    """GET a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (operator-given URL)
        return resp.read().decode("utf-8")


class PrometheusObserver:
    """Scrapes one or more frontends each tick and turns scrape differences into Observations."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 5.0,
        fetch: Callable[[str, float], str] = fetch_metrics_text,
    ) -> None:
        if not urls:
            raise ValueError("PrometheusObserver needs at least one metrics URL")
        self.urls = tuple(urls)
        self.timeout_s = timeout_s
        self._fetch = fetch
        self._prev: tuple[float, MetricsSnapshot] | None = None

    def scrape(self) -> MetricsSnapshot:
        """Fetch and sum every frontend's metrics (raises OSError/ValueError on failure)."""
        total = MetricsSnapshot()
        for url in self.urls:
            total = total + parse_metrics(self._fetch(url, self.timeout_s))
        return total

    def observe(self, now: float, prefill_replicas: int, decode_replicas: int) -> Observations | None:
        """Scrape at time `now`; None on the first call (it only sets the baseline)."""
        snap = self.scrape()
        prev = self._prev
        self._prev = (now, snap)
        if prev is None or now <= prev[0]:
            return None
        return observations_between(
            prev[1],
            snap,
            interval_s=now - prev[0],
            timestamp=now,
            prefill_replicas=prefill_replicas,
            decode_replicas=decode_replicas,
        )
