"""Prometheus metrics of one frontend (prefix `splitserve_`), in a registry owned by the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

if TYPE_CHECKING:
    from splitserve.frontend.worker_pool import WorkerPool

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
                300.0, 600.0)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))

#: requests_total{status}: how a request ended.
STATUSES = ("success", "invalid", "aborted", "unavailable", "error")


class FrontendMetrics:
    """All metrics of one app; `render()` gives the Prometheus text."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds", "Time from request arrival to its first token.",
            buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            "splitserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            "splitserve_e2e_latency_seconds", "Time from request arrival to its last token.",
            buckets=_E2E_BUCKETS, registry=r)
        self.input_tokens = Histogram(
            "splitserve_input_tokens", "Prompt tokens per request.", buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram(
            "splitserve_output_tokens", "Generated tokens per request (all choices).",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.requests = Counter(
            "splitserve_requests", "Requests by how they ended.", ["status"], registry=r)
        self.in_flight = Gauge(
            "splitserve_requests_in_flight", "Requests being served by this frontend.", registry=r)
        self.queued = Gauge(
            "splitserve_requests_queued", "Requests waiting in worker queues (last Stats poll).",
            registry=r)
        self.kv_usage = Gauge(
            "splitserve_kv_cache_usage", "Fraction of a worker's KV blocks in use (last Stats poll).",
            ["worker"], registry=r)
        self.workers = Gauge(
            "splitserve_workers", "Healthy workers per role.", ["role"], registry=r)
        self.prefill_decisions = Counter(
            "splitserve_prefill_decisions", "Where prompts were prefilled (with prefill workers up).",
            ["kind"], registry=r)
        self.prefill_fallbacks = Counter(
            "splitserve_prefill_fallbacks",
            "Remote prefills that failed and ran on the decode worker instead.", ["reason"],
            registry=r)
        self.kv_pull_failures = Gauge(
            "splitserve_kv_pull_failures",
            "KV pulls a decode worker gave up on (then prefilled locally), since it started.",
            ["worker"], registry=r)
        self.expired_pins = Gauge(
            "splitserve_kv_expired_pins",
            "Pinned prefills a prefill worker freed unpulled after the timeout, since it started.",
            ["worker"], registry=r)
        for status in STATUSES:
            self.requests.labels(status=status)
        for kind in ("remote", "local"):
            self.prefill_decisions.labels(kind=kind)

    def observe_pool(self, pool: "WorkerPool") -> None:
        """Stats-poll hook: queue depth, KV usage per worker, healthy workers per role."""
        queued = 0
        for w in pool.workers():
            if w.stats is not None:
                self.kv_usage.labels(worker=w.worker_id).set(w.kv_usage)
                if w.role == "decode":
                    self.kv_pull_failures.labels(worker=w.worker_id).set(w.stats.num_kv_pull_failures)
                else:
                    self.expired_pins.labels(worker=w.worker_id).set(w.stats.num_expired_pins)
                if w.healthy:
                    queued += int(w.stats.num_waiting)
        self.queued.set(queued)
        for role, n in pool.counts().items():
            self.workers.labels(role=role).set(n)

    def forget_worker(self, worker_id: str) -> None:
        for gauge in (self.kv_usage, self.kv_pull_failures, self.expired_pins):
            try:
                gauge.remove(worker_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
