"""`splitserve bench serve`: load a running OpenAI-compatible server and measure it.

    splitserve bench serve --url http://127.0.0.1:8000 --json out.json \\
        --concurrency 16 --num-requests 64 --isl 512 --osl 128 --slo-ttft-ms 2000 --slo-itl-ms 100

Synthetic prompts are token ids sent to /v1/completions (exact input lengths, no client-side
tokenizer), with `ignore_eos` so every request produces its full output length; an optional
shared prefix exercises prefix caching. Requests go out at a fixed concurrency or as a
Poisson process (`--rate`). Reported: TTFT, ITL (gaps between streamed chunks), TPOT (mean
time per output token after the first, per request) and end-to-end latency p50/p90/p99;
request and token throughput; SLO attainment (share of requests with TTFT <= --slo-ttft-ms
and TPOT <= --slo-itl-ms) and goodput (such requests per second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Synthetic prompt ids are drawn from this range: ordinary vocabulary, no special/byte tokens.
TOKEN_ID_RANGE = (300, 20_000)


@dataclass(frozen=True)
class ServeBenchConfig:
    """One benchmark run."""

    #: Server base URL (with or without /v1).
    url: str
    #: Model name to send; None: the first one /v1/models lists.
    model: str | None = None
    api_key: str | None = None
    #: Requests in flight at once (closed loop); ignored when `rate` is set.
    concurrency: int = 16
    #: Poisson arrival rate in requests/s (open loop); None: closed loop at `concurrency`.
    rate: float | None = None
    num_requests: int = 64
    #: Mean input and output lengths in tokens.
    isl: int = 512
    osl: int = 128
    #: Uniform jitter of lengths: each is drawn from [len*(1-j), len*(1+j)].
    len_jitter: float = 0.0
    #: Leading tokens shared by every prompt (counted inside isl).
    shared_prefix_len: int = 0
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    #: Requests sent (and discarded) before measuring.
    warmup: int = 1
    seed: int = 0
    #: Seconds one request may take.
    timeout_s: float = 600.0
    #: [low, high) of the synthetic prompt token ids.
    token_id_range: tuple[int, int] = TOKEN_ID_RANGE
    progress: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.isl < 1 or self.osl < 1:
            raise ValueError("isl and osl must be >= 1")
        if not (0.0 <= self.len_jitter < 1.0):
            raise ValueError("len_jitter must be in [0, 1)")
        if not (0 <= self.shared_prefix_len < self.isl):
            raise ValueError("shared_prefix_len must be in [0, isl)")


@dataclass
class RequestResult:
    input_len: int
    output_len: int = 0
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    #: Gaps between consecutive streamed chunks after the first (seconds).
    itls: list[float] = field(default_factory=list)
    #: Start time relative to the benchmark start (seconds).
    start: float = 0.0
    #: Prompt tokens the server answered from its prefix cache (usage.prompt_tokens_details).
    cached_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def make_workload(cfg: ServeBenchConfig) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, reproducible from the seed."""
    rng = random.Random(cfg.seed)
    lo, hi = cfg.token_id_range
    prefix = [rng.randrange(lo, hi) for _ in range(cfg.shared_prefix_len)]

    def jitter(n: int) -> int:
        if cfg.len_jitter == 0:
            return n
        return max(1, round(rng.uniform(n * (1 - cfg.len_jitter), n * (1 + cfg.len_jitter))))

    out = []
    for _ in range(cfg.num_requests + cfg.warmup):
        isl = max(cfg.shared_prefix_len + 1, jitter(cfg.isl))
        prompt = prefix + [rng.randrange(lo, hi) for _ in range(isl - len(prefix))]
        out.append((prompt, jitter(cfg.osl)))
    return out


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int,
                      t0: float) -> RequestResult:
    res = RequestResult(input_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    res.start = start - t0
    last = None
    try:
        async with client.stream("POST", url + "/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = msg["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if msg.get("usage"):
                    res.output_len = int(msg["usage"]["completion_tokens"])
                    details = msg["usage"].get("prompt_tokens_details") or {}
                    res.cached_tokens = int(details.get("cached_tokens") or 0)
                if any(c.get("text") for c in msg.get("choices") or ()):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens received"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def summarize(cfg: ServeBenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    from splitserve.bench.common import stats_ms

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)

    def meets(r: RequestResult) -> bool:
        if cfg.slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > cfg.slo_ttft_ms):
            return False
        if cfg.slo_itl_ms is not None and (r.tpot is not None and r.tpot * 1000 > cfg.slo_itl_ms):
            return False
        return True

    good = [r for r in ok if meets(r)]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration if duration else None,
        "output_throughput_tok_s": out_tokens / duration if duration else None,
        "input_throughput_tok_s": in_tokens / duration if duration else None,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itls]),
        "tpot_ms": stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": stats_ms([r.e2e for r in ok if r.e2e is not None]),
        "slo": {"ttft_ms": cfg.slo_ttft_ms, "itl_ms": cfg.slo_itl_ms},
        "slo_attainment": len(good) / len(results) if results else None,
        "goodput_rps": len(good) / duration if duration else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


async def run_benchmark(cfg: ServeBenchConfig) -> tuple[dict[str, Any], list[RequestResult]]:
    """Run the load; (summary dict, per-request results)."""
    import httpx

    base = cfg.url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout_s, limits=limits,
                                 trust_env=False) as client:
        model = cfg.model
        if model is None:
            r = await client.get(base + "/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        workload = make_workload(cfg)
        warm, work = workload[: cfg.warmup], workload[cfg.warmup :]
        for prompt, osl in warm:
            await one_request(client, base, model, prompt, osl, time.perf_counter())

        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(work), desc="bench serve", unit="req")
        results: list[RequestResult] = []
        t0 = time.perf_counter()

        async def run_one(prompt, osl):
            res = await one_request(client, base, model, prompt, osl, t0)
            results.append(res)
            if bar is not None:
                bar.update(1)

        if cfg.rate is None:
            queue: asyncio.Queue = asyncio.Queue()
            for item in work:
                queue.put_nowait(item)

            async def worker():
                while not queue.empty():
                    prompt, osl = queue.get_nowait()
                    await run_one(prompt, osl)

            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(work)))))
        else:
            rng = random.Random(cfg.seed + 1)
            tasks = []
            for prompt, osl in work:
                tasks.append(asyncio.create_task(run_one(prompt, osl)))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()

    summary = summarize(cfg, results, duration)
    summary = {"bench": "serve", "url": cfg.url, "model": model,
               "config": asdict(cfg) | {"api_key": None}, **summary}
    return summary, results


def plot_cdfs(results: list[RequestResult], path: str, cfg: ServeBenchConfig) -> None:
    """Latency CDFs (TTFT, TPOT, e2e) with the SLOs marked; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    series = [
        ("TTFT (ms)", [r.ttft * 1000 for r in ok if r.ttft is not None], cfg.slo_ttft_ms),
        ("TPOT (ms)", [r.tpot * 1000 for r in ok if r.tpot is not None], cfg.slo_itl_ms),
        ("end-to-end (ms)", [r.e2e * 1000 for r in ok if r.e2e is not None], None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, values, slo) in zip(axes, series):
        values = sorted(values)
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post")
        if slo is not None:
            ax.axvline(slo, color="red", linestyle="--", label=f"SLO {slo:g} ms")
            ax.legend(loc="lower right")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    load = f"rate {cfg.rate:g}/s" if cfg.rate else f"concurrency {cfg.concurrency}"
    fig.suptitle(f"splitserve bench serve: {load}, ISL {cfg.isl}, OSL {cfg.osl}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- CLI ------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="load a running server: TTFT, ITL, throughput, goodput")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=16, help="closed loop (default 16)")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--isl", type=int, default=512, help="input tokens per request (default 512)")
    p.add_argument("--osl", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--len-jitter", type=float, default=0.0,
                   help="draw lengths uniformly from [len*(1-j), len*(1+j)] (default 0)")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="leading prompt tokens shared by all requests (default 0)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-itl-ms", type=float, default=None,
                   help="SLO on each request's mean time per output token")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw latency CDFs (matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from splitserve.bench.common import emit

    try:
        cfg = ServeBenchConfig(
            url=args.url, model=args.model, api_key=args.api_key, concurrency=args.concurrency,
            rate=args.rate, num_requests=args.num_requests, isl=args.isl, osl=args.osl,
            len_jitter=args.len_jitter, shared_prefix_len=args.shared_prefix_len,
            slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms, warmup=args.warmup,
            seed=args.seed, progress=not args.no_progress,
        )
    except ValueError as exc:
        print(f"splitserve bench serve: {exc}", file=sys.stderr)
        return 2
    summary, results = asyncio.run(run_benchmark(cfg))
    if args.plot:
        try:
            plot_cdfs(results, args.plot, cfg)
            summary["plot"] = args.plot
        except ImportError:
            logger.error("--plot needs matplotlib (pip install matplotlib); no plot written")
    emit(summary, args.json_path)
    return 0 if summary["completed"] else 1
