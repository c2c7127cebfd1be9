"""The live planner loop: observe → `Planner.on_tick` → `connector.apply`, every interval.

Lifecycle: the first scrape only sets the metrics baseline; then, every `interval_s`, the
loop reads the current pool sizes from the connector, scrapes the frontends, turns the
difference into `Observations`, asks the planner for a `Decision` and hands it to the
connector. A failed scrape or apply is logged and the tick skipped (the next one compares
against the last good scrape). `stop` (set by SIGINT/SIGTERM in the CLI) ends the loop
between ticks, at once; the connector is closed on the way out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from splitserve.planner.connectors import Connector, ConnectorError
from splitserve.planner.core import Planner
from splitserve.planner.observe import PrometheusObserver
from splitserve.planner.types import Decision

log = logging.getLogger(__name__)


def run_loop(
    planner: Planner,
    observer: PrometheusObserver,
    connector: Connector,
    *,
    interval_s: float,
    stop: threading.Event,
    max_ticks: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_decision: Callable[[Decision], None] | None = None,
) -> int:
    """Run until `stop` is set (or `max_ticks` decisions were made); returns the decisions made."""
    decisions = 0
    try:
        try:
            observer.observe(clock(), *connector.current())
        except (OSError, ValueError, ConnectorError) as exc:
            log.warning("first scrape failed (%s); retrying next tick", exc)
        while not stop.wait(interval_s):
            try:
                prefill, decode = connector.current()
                obs = observer.observe(clock(), prefill, decode)
            except (OSError, ValueError, ConnectorError) as exc:
                log.warning("observation failed, tick skipped: %s", exc)
                continue
            if obs is None:
                continue
            decision = planner.on_tick(obs)
            log.info(
                "tick: %.2f rps, ttft %s ms, itl %s ms -> prefill %d, decode %d (%s)",
                obs.request_rate,
                _fmt(obs.mean_ttft_ms),
                _fmt(obs.mean_itl_ms),
                decision.prefill_replicas,
                decision.decode_replicas,
                decision.reason,
            )
            try:
                connector.apply(decision)
            except Exception:  # a connector error must not kill the planner
                log.exception("connector failed to apply the decision")
            decisions += 1
            if on_decision is not None:
                on_decision(decision)
            if max_ticks is not None and decisions >= max_ticks:
                break
    finally:
        connector.close()
    return decisions


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
