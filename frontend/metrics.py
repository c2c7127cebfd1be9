"""Prometheus metrics of one frontend (prefix `splitserve_`), in a registry owned by the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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

    def attach_router(self, source: Callable[[], dict[str, Any]]) -> None:
        """Export the KV router's figures (`frontend.routing.KvRouting.metrics`), read at
        each scrape: `splitserve_router_*`."""
        self.registry.register(RouterCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouterCollector:
    """`splitserve_router_*` from a KvRouting.metrics() dict, read at scrape time."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    @staticmethod
    def _families() -> dict[str, Any]:
        c, g = CounterMetricFamily, GaugeMetricFamily
        return {
            "info": g("splitserve_router_info", "The KV router's routing mode.", labels=["mode"]),
            "requests": c("splitserve_router_requests",
                          "Requests the router sent to a decode (or aggregated) worker."),
            "prompt_blocks": c("splitserve_router_prompt_blocks",
                               "Full prompt blocks of the requests routed to decode workers."),
            "overlap_blocks": c("splitserve_router_overlap_blocks",
                                "Of those, blocks the chosen worker already held (prefix hits)."),
            "prefix_hit_rate": g("splitserve_router_prefix_hit_rate",
                                 "overlap_blocks / prompt_blocks since start."),
            "no_worker": c("splitserve_router_no_worker",
                           "Picks refused because every worker was busy or none was known (503)."),
            "fallback_picks": c("splitserve_router_fallback_picks",
                                "Picks made without the router (it knew none of the candidates)."),
            "resyncs": c("splitserve_router_resyncs",
                         "Index resyncs from a worker snapshot after lost KV events."),
            "indexed_blocks": g("splitserve_router_indexed_blocks",
                                "Distinct block hashes in the router's index."),
            "tracked_requests": g("splitserve_router_tracked_requests",
                                  "Routed requests in the router's load view."),
            "workers": g("splitserve_router_workers",
                         "Workers the router follows, by KV event state.",
                         labels=["worker", "role", "state"]),
            "routed": c("splitserve_router_routed_requests",
                        "Requests routed to each decode worker.", labels=["worker"]),
            "routed_overlap": c("splitserve_router_routed_overlap_blocks",
                                "Prompt blocks already cached on the decode worker chosen.",
                                labels=["worker"]),
        }

    def describe(self):
        return list(self._families().values())

    def collect(self):
        f = self._families()
        try:
            m = self._source()
        except Exception:  # noqa: BLE001 - a scrape must not fail because of the router
            return []
        f["info"].add_metric([str(m.get("mode", ""))], 1)
        for key in ("requests", "prompt_blocks", "overlap_blocks", "no_worker",
                    "fallback_picks", "resyncs", "prefix_hit_rate", "indexed_blocks",
                    "tracked_requests"):
            f[key].add_metric([], float(m.get(key, 0)))
        for wid, role, state in m.get("workers", ()):
            f["workers"].add_metric([wid, role, state], 1)
        for wid, n in m.get("routed", {}).items():
            f["routed"].add_metric([wid], n)
        for wid, n in m.get("routed_overlap_blocks", {}).items():
            f["routed_overlap"].add_metric([wid], n)
        return list(f.values())
