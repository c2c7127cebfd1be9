"""The live part of `splitserve bench router`: kv vs round-robin vs random routing on real
workers, same workload for each.

For each mode: start `splitserve serve --decode-workers 2 --router-mode MODE` (aggregated
workers, one torch thread each, a KV cache sized to hold about half of the system prompts
per worker), wait until its router follows both workers' KV events, warm both workers up,
then replay the workload — `num_prefixes` distinct system prompts of `prefix_tokens` tokens,
each request one of them (uniformly) plus a short fresh user turn, `osl` output tokens,
Poisson arrivals at `rate` per second — as streamed /v1/completions with token-id prompts;
record each request's TTFT and `prompt_tokens_details.cached_tokens`, scrape the router's
metrics, stop the server. Every mode starts from cold workers and sees the same requests at
the same times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitserve.bench.disagg import ServeProcess

logger = logging.getLogger(__name__)

#: Prompt token ids are drawn from this range (ordinary vocabulary of SmolLM2).
TOKEN_ID_RANGE = (300, 20_000)
MODES = ("kv", "round-robin", "random")


@dataclass(frozen=True)
class LiveConfig:
    """One live comparison."""

    #: Routing modes compared, in run order.
    modes: tuple[str, ...] = MODES
    #: Distinct system prompts, and their length in tokens.
    num_prefixes: int = 8
    prefix_tokens: int = 1024
    #: User turn length range (tokens, inclusive), fresh tokens per request.
    user_tokens: tuple[int, int] = (16, 48)
    #: Output tokens per request.
    osl: int = 8
    num_requests: int = 96
    #: Poisson arrival rate (requests/s).
    rate: float = 0.4
    #: KV cache per worker: 104 MiB is ~295 blocks of SmolLM2 bf16, room for 4 of the 8
    #: system prompts (64 blocks each) plus the requests in flight.
    kv_cache_memory: str = "104MiB"
    max_model_len: int = 2048
    model: str = "smollm2-135m"
    seed: int = 0
    #: Seconds to wait for a server to come up.
    ready_timeout_s: float = 600.0
    #: Seconds one request may take.
    request_timeout_s: float = 600.0
    extra_serve_flags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.modes or any(m not in ("kv", "round-robin", "random", "least-loaded")
                                 for m in self.modes):
            raise ValueError(f"modes must be among kv|round-robin|random|least-loaded: {self.modes}")
        if self.num_prefixes < 1 or self.prefix_tokens < 1 or self.num_requests < 1:
            raise ValueError("num_prefixes, prefix_tokens and num_requests must be >= 1")
        if not (1 <= self.user_tokens[0] <= self.user_tokens[1]):
            raise ValueError("user_tokens must be (lo, hi) with 1 <= lo <= hi")
        if self.rate <= 0 or self.osl < 1:
            raise ValueError("rate must be > 0 and osl >= 1")
        if self.prefix_tokens + self.user_tokens[1] + self.osl > self.max_model_len:
            raise ValueError("prefix + user turn + output exceed max_model_len")


@dataclass(frozen=True)
class Item:
    """One request of the workload."""

    prefix: int
    prompt: list[int]
    #: Seconds after the start of the run.
    at: float


def make_workload(cfg: LiveConfig) -> list[Item]:
    rng = random.Random(cfg.seed)
    lo, hi = TOKEN_ID_RANGE
    prefixes = [[rng.randrange(lo, hi) for _ in range(cfg.prefix_tokens)]
                for _ in range(cfg.num_prefixes)]
    items, t = [], 0.0
    for _ in range(cfg.num_requests):
        p = rng.randrange(cfg.num_prefixes)
        user = [rng.randrange(lo, hi) for _ in range(rng.randint(*cfg.user_tokens))]
        items.append(Item(p, prefixes[p] + user, t))
        t += rng.expovariate(cfg.rate)
    return items


@dataclass
class Result:
    prefix: int
    prompt_tokens: int
    #: Scheduled arrival (seconds after the start).
    at: float = 0.0
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    cached_tokens: int = 0


# -- the server ----------------------------------------------------------------------------
# -- the client ----------------------------------------------------------------------------
async def scrape(client: Any, base: str) -> str:
    return (await client.get(base + "/metrics")).text


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def wait_router_follows(client: Any, base: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(client, base)
        if len(re.findall(r'^splitserve_router_workers\{.*state="events".*\} 1\.0$', text,
                          re.M)) >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router does not follow {n} workers' KV events")
        await asyncio.sleep(0.2)


async def one_request(client: Any, base: str, model: str, item: Item, osl: int) -> Result:
    """One streamed completion (bench/serve.py's client), as this benchmark's Result."""
    from splitserve.bench.serve import one_request as stream_one

    r = await stream_one(client, base + "/v1", model, item.prompt, osl, 0.0)
    return Result(item.prefix, len(item.prompt), item.at, ok=r.ok, error=r.error, ttft=r.ttft,
                  e2e=r.e2e, cached_tokens=r.cached_tokens)


async def drive(cfg: LiveConfig, base: str, work: list[Item], progress: bool
                ) -> tuple[list[Result], str, float]:
    """Warm up, replay the workload; (results, final /metrics text, duration)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s, limits=limits,
                                 trust_env=False) as client:
        await wait_router_follows(client, base, 2, cfg.ready_timeout_s)
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        # Warm-up: short unrelated prompts, concurrently, so both workers run once.
        rng = random.Random(cfg.seed + 99)
        warm = [Item(-1, [rng.randrange(*TOKEN_ID_RANGE) for _ in range(24)], 0.0)
                for _ in range(4)]
        await asyncio.gather(*(one_request(client, base, model, w, 2)
                               for w in warm))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(work), desc="requests", unit="req", leave=False)
        results: list[Result] = []
        t0 = time.perf_counter()

        async def fire(item: Item) -> None:
            await asyncio.sleep(max(0.0, item.at - (time.perf_counter() - t0)))
            results.append(await one_request(client, base, model, item, cfg.osl))
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(fire(it) for it in work))
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        text = await scrape(client, base)
    return results, text, duration


def summarize(results: list[Result], metrics_text: str, duration: float) -> dict[str, Any]:
    from splitserve.bench.common import percentile

    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1000.0 for r in ok if r.ttft is not None]
    e2e = [r.e2e * 1000.0 for r in ok if r.e2e is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    routed = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^splitserve_router_routed_requests_total\{worker="([^"]+)"\} (\S+)$',
        metrics_text, re.M)}
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else None,
        "e2e_p50_ms": percentile(e2e, 50),
        # Ground truth from the workers: prompt tokens served from their prefix caches.
        "prefix_hit_rate": cached / prompt if prompt else None,
        # Requests whose system prompt was (at least mostly) cached where they ran.
        "requests_with_hit": sum(r.cached_tokens >= r.prompt_tokens // 2 for r in ok),
        # The router's own estimate at routing time (overlap blocks / prompt blocks).
        "router_prefix_hit_rate": metric(metrics_text, "splitserve_router_prefix_hit_rate"),
        "routed_per_worker": routed,
        "errors": sorted({r.error for r in results if r.error})[:5],
        # [arrival s, system prompt, TTFT ms, cached tokens] per request, in arrival order.
        "requests": [[round(r.at, 3), r.prefix,
                      round(r.ttft * 1000.0, 1) if r.ttft is not None else None, r.cached_tokens]
                     for r in sorted(results, key=lambda r: r.at)],
    }


def run_live(cfg: LiveConfig, progress: bool = False) -> dict[str, Any]:
    """Every mode on fresh servers, the same workload; the per-mode summaries and the
    report keys (`ttft_p50_ms.<mode>` with '-' as '_', p90, prefix-hit rate)."""
    work = make_workload(cfg)
    per_mode: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as logdir:
        for mode in cfg.modes:
            logger.info("bench router live: mode %s", mode)
            flags = ["--model", cfg.model, "--port", "0", "--decode-workers", "2",
                     "--num-threads-per-worker", "1", "--dtype", "auto",
                     "--kv-cache-memory", cfg.kv_cache_memory, "--max-model-len", str(cfg.max_model_len),
                     "--stats-interval", "0.2", "--router-mode", mode, *cfg.extra_serve_flags]
            t = time.monotonic()
            with ServeProcess(flags, {"decode": 2}, Path(logdir) / f"serve-{mode}.log",
                              cfg.ready_timeout_s) as serve:
                startup = time.monotonic() - t
                results, text, duration = asyncio.run(drive(cfg, serve.url, work, progress))
            per_mode[mode] = {"startup_s": startup, **summarize(results, text, duration)}
            if progress:
                s = per_mode[mode]
                print(f"{mode}: TTFT p50 {s['ttft_p50_ms']:.0f} ms, p90 {s['ttft_p90_ms']:.0f} ms, "
                      f"prefix hits {s['prefix_hit_rate']:.2f}", file=sys.stderr)
    key = {m: m.replace("-", "_") for m in cfg.modes}
    out: dict[str, Any] = {
        "ttft_p50_ms": {key[m]: per_mode[m]["ttft_p50_ms"] for m in cfg.modes},
        "ttft_p90_ms": {key[m]: per_mode[m]["ttft_p90_ms"] for m in cfg.modes},
        "prefix_hit_rate": {key[m]: per_mode[m]["prefix_hit_rate"] for m in cfg.modes},
    }
    kv = per_mode.get("kv", {}).get("ttft_p50_ms")
    for other in ("round-robin", "random"):
        o = per_mode.get(other, {}).get("ttft_p50_ms")
        if kv and o:
            out.setdefault("ttft_p50_ratio_vs_kv", {})[key[other]] = o / kv
    out["config"] = asdict(cfg)
    out["modes"] = per_mode
    return out
