"""KV-aware routing end to end: `splitserve serve --decode-workers 2` (SmolLM2, bf16, one
thread per worker), two distinct 256-token prefixes, several requests each, one at a time.

In kv mode (the default) each prefix's follow-ups land on the worker that served it first
(the frontend's `splitserve_router_routed_requests_total{worker}` says where each request
went) and hit its prefix cache (usage `prompt_tokens_details.cached_tokens`); the two
prefixes are spread over the two workers. With `--router-mode round-robin` the same
sequence hits the cache less often.
"""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest

from tests.helpers.serve import start_serve, stop_serve

pytestmark = pytest.mark.live

FLAGS = ["--port", "0", "--decode-workers", "2", "--dtype", "auto",
         "--num-threads-per-worker", "1", "--kv-cache-memory", "64MiB", "--max-model-len", "1024",
         "--stats-interval", "0.2"]
PREFIX_LEN = 256
#: Which prefix each request carries, in order (sequential requests). Round-robin over two
#: workers sends consecutive requests to alternating workers, so a prefix repeated back to
#: back misses there, while kv mode keeps each prefix on one worker.
SEQUENCE = "AABBAB"


def prompts() -> dict[str, list[int]]:
    rng = random.Random(7)
    return {name: [rng.randrange(300, 20_000) for _ in range(PREFIX_LEN)] for name in "AB"}


def routed(base: str, client: httpx.Client) -> dict[str, float]:
    text = client.get(base + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^splitserve_router_routed_requests_total\{worker="([^"]+)"\} (\S+)$', text, re.M)}


def wait_router_follows(base: str, client: httpx.Client, n: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = client.get(base + "/metrics").text
        if len(re.findall(r'^splitserve_router_workers\{.*state="events".*\} 1\.0$', text,
                          re.M)) >= n:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"router does not follow {n} workers:\n{text[-2000:]}")
        time.sleep(0.1)


def run_sequence(*mode_flags: str) -> tuple[list[tuple[str, str, int]], str]:
    """[(prefix, worker, cached_tokens)] for SEQUENCE, and the final /metrics text."""
    proc, url = start_serve(*FLAGS, *mode_flags)
    base = url[: -len("/v1")]
    out = []
    try:
        with httpx.Client(timeout=120, trust_env=False) as client:
            wait_router_follows(base, client, 2)
            ps = prompts()
            for turn, name in enumerate(SEQUENCE):
                before = routed(base, client)
                r = client.post(url + "/completions", json={
                    "model": "smollm2-135m", "prompt": ps[name] + [400 + turn, 401, 402],
                    "max_tokens": 2, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                after = routed(base, client)
                (worker,) = [w for w, n in after.items() if n != before.get(w, 0)]
                cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                out.append((name, worker, cached))
                time.sleep(0.1)  # let the worker's KV events reach the router
            metrics = client.get(base + "/metrics").text
    finally:
        assert stop_serve(proc) == 0
    return out, metrics


def hit_rate(metrics: str) -> float:
    m = re.search(r"^splitserve_router_prefix_hit_rate (\S+)$", metrics, re.M)
    assert m, metrics[-2000:]
    return float(m.group(1))


def test_repeated_prefix_lands_on_the_worker_that_holds_it():
    results, metrics = run_sequence()
    home: dict[str, str] = {}
    for name, worker, cached in results:
        if name in home:
            assert worker == home[name], results            # follows its prefix
            assert cached >= PREFIX_LEN, results             # and hits its cache
        else:
            home[name] = worker
            assert cached < PREFIX_LEN, results              # first time: nothing cached
    assert home["A"] != home["B"], results                   # load spread over both
    assert 'splitserve_router_info{mode="kv"} 1.0' in metrics
    # 4 of 6 requests find their 16 prefix blocks (of 16 full prompt blocks each).
    assert hit_rate(metrics) >= 0.6, metrics


def test_round_robin_hits_the_prefix_cache_less():
    results, metrics = run_sequence("--router-mode", "round-robin")
    assert 'splitserve_router_info{mode="round-robin"} 1.0' in metrics
    hits = sum(cached >= PREFIX_LEN for _, _, cached in results)
    assert hits <= 2, results                                # kv mode: 4
    assert hit_rate(metrics) < 0.6, metrics
