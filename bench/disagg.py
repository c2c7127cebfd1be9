"""`splitserve bench disagg`: aggregated against disaggregated serving on the same cores.

    splitserve bench disagg --json disagg.json [--plot disagg.png] [--quick] \\
        [--rates R1 R2 ...] [--slo-ttft-ms X --slo-itl-ms Y]

Lifecycle: every (rate, setup) point gets its own fresh `splitserve serve` child process
(1 torch thread per worker, bf16) — one at a time, never two setups at once: start it, wait
until its /health counts every worker, warm every worker with short requests, time
middle-length requests alone (the *solo* figures: 3 for the very first point, which sets
the rates and SLOs, then 1 per point as a gauge of how fast the machine was), drive it with
a prefill-heavy Poisson workload at that rate until every request has finished, SIGTERM it
and wait for it to exit. Setups alternate in ABBA order over the rates (aggregated first),
so a slow drift of the machine's load falls on both alike. The setups:

- aggregated: `serve --decode-workers 2 --prefill-workers 0` (each worker prefills its own
  requests in chunks co-scheduled with the decode steps of the requests it is running);
- disaggregated: `serve --prefill-workers 1 --decode-workers 1` (serve's conditional
  disaggregation: these long prompts go to the prefill worker and the decode worker pulls
  their KV blocks, except that a full prefill queue spills a prompt onto the decode worker,
  which prefills it in its idle time; `--max-local-prefill-tokens 0` sends every prompt
  remote).

Workload: prompts of random token ids, ISL uniform in [1024, 2048], OSL uniform in
[64, 128], `ignore_eos`; request i of rate k is the same in both setups.

ITL is measured per request as its TPOT: (e2e - TTFT) / (output tokens - 1), the mean gap
between its tokens after the first. A request meets the SLOs when TTFT <= --slo-ttft-ms
and TPOT <= --slo-itl-ms; a failed request meets neither. Per setup and rate: SLO
attainment (share of requests meeting both; also each SLO alone, to show which latency
breaks), goodput (requests meeting both / run duration, from the first arrival to the
last completion), TTFT and TPOT p50/p90 over requests, and, to see stalls that a mean
hides, each request's p90 and largest token gap (p50/p90/max over requests); the
requests themselves; and `itl_slo_sensitivity`, the same requests re-scored at ITL SLOs of
1.5-4 x solo TPOT (the headline figures stay those at the chosen SLO). A setup's `goodput_rps` is the best over the
rates; `goodput_ratio` = disaggregated / aggregated. Beside it,
`max_rate_ratio_at_target_attainment` is DistServe's reading: the ratio of the highest
tested rates at which each setup keeps the attainment target (0.9), so bounded by the grid.

Rates and SLOs default to multiples of the solo figures of the first point (aggregated),
because on a shared 2-core machine the capacity moves with the load of everything else:
capacity = 1 / solo TTFT at the middle ISL (one worker thread prefilling back to back);
rates = capacity x (0.5, 0.75, 1, 1.5, 2) (--quick: 0.5, 1); TTFT SLO = 4 x solo TTFT;
ITL SLO = 1.5 x solo TPOT (tight: one co-scheduled prefill breaks it). --rates and
--slo-*-ms override. The JSON records the solo figures and the load average of every point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splitserve.engine.config import KV_CACHE_DTYPES
from splitserve.kv_transfer.config import TRANSPORT_KINDS

logger = logging.getLogger(__name__)

#: serve flags of each setup, in the order they run (the first one is calibrated).
SETUPS: dict[str, list[str]] = {
    "aggregated": ["--decode-workers", "2", "--prefill-workers", "0"],
    "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1"],
}
#: /health worker counts each setup must reach.
SETUP_WORKERS: dict[str, dict[str, int]] = {
    "aggregated": {"decode": 2, "prefill": 0},
    "disaggregated": {"decode": 1, "prefill": 1},
}
FULL_RATE_MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
QUICK_RATE_MULTIPLIERS = (0.5, 1.0)
ITL_METRIC = "TPOT: per request (e2e - ttft) / (output_tokens - 1)"
GOODPUT_BASIS = "best over rates of goodput_rps (requests meeting both SLOs / run duration)"
TARGET_GOODPUT_RATIO = 1.5
#: ITL SLO scales (x solo TPOT) the report re-scores its requests at.
ITL_SLO_SENSITIVITY = (1.5, 2.0, 2.5, 3.0, 4.0)


@dataclass(frozen=True)
class DisaggBenchConfig:
    """One `bench disagg` run."""

    #: Model both setups serve (serve's --model).
    model: str = "smollm2-135m"
    #: Weights dtype of every worker.
    dtype: str = "auto"
    #: KV cache dtype of every worker (serve's --kv-cache-dtype; auto: dtype's).
    kv_cache_dtype: str = "auto"
    #: KV transport of the disaggregated setup (auto: NIXL when it starts, else gRPC).
    kv_transport: str = "auto"
    #: Inclusive ranges the input and output lengths are drawn from, uniformly.
    isl_range: tuple[int, int] = (1024, 2048)
    osl_range: tuple[int, int] = (64, 128)
    #: Poisson rates (requests/s); None: rate_multipliers x the calibrated capacity.
    rates: tuple[float, ...] | None = None
    rate_multipliers: tuple[float, ...] = FULL_RATE_MULTIPLIERS
    #: Measured requests per rate.
    num_requests: int = 20
    #: SLOs in ms; None: the scale x the solo TTFT / TPOT of the first setup.
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    #: Default SLOs as multiples of the first point's solo TTFT and TPOT.
    slo_ttft_scale: float = 4.0
    slo_itl_scale: float = 1.5
    #: Attainment a rate must reach to count in `max_rate_at_target_attainment`.
    attainment_target: float = 0.9
    #: serve --pin-workers in both setups: each worker on its own core, so the prefill and
    #: decode pools (or the two aggregated workers) never share one.
    pin_workers: bool = True
    #: --max-prefill-queue of the disaggregated frontend; None: serve's default.
    max_prefill_queue: int | None = None
    #: --max-local-prefill-tokens of the disaggregated frontend; None: serve's default.
    max_local_prefill_tokens: int | None = None
    #: Seeds the prompts and arrival times (the same in both setups).
    seed: int = 0
    #: Seconds one request may take; seconds a server may take to become healthy.
    request_timeout_s: float = 1800.0
    ready_timeout_s: float = 600.0
    #: Recorded only: whether the rates and request counts are --quick's.
    quick: bool = False
    #: Progress bars while a rate runs.
    progress: bool = True

    def __post_init__(self) -> None:
        for name, least in (("isl_range", 1), ("osl_range", 2)):
            lo, hi = getattr(self, name)
            if not (least <= lo <= hi):
                raise ValueError(f"{name} must be {least} <= LO <= HI, got {lo} {hi}")
        if self.rates is not None and (not self.rates or min(self.rates) <= 0):
            raise ValueError("rates must be > 0")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be {'|'.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if not self.rate_multipliers or min(self.rate_multipliers) <= 0:
            raise ValueError("rate multipliers must be > 0")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        for name in ("slo_ttft_ms", "slo_itl_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.slo_ttft_scale <= 0 or self.slo_itl_scale <= 0:
            raise ValueError("SLO scales must be > 0")
        if not (0 < self.attainment_target <= 1):
            raise ValueError("attainment_target must be in (0, 1]")

    @property
    def mid_isl(self) -> int:
        return (self.isl_range[0] + self.isl_range[1]) // 2

    @property
    def mid_osl(self) -> int:
        return (self.osl_range[0] + self.osl_range[1]) // 2


# -- pure logic (unit-tested) ---------------------------------------------------------------
def make_requests(isl_range: tuple[int, int], osl_range: tuple[int, int], n: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per request, lengths uniform in the inclusive ranges; the
    same seed gives the same requests."""
    from splitserve.bench.serve import TOKEN_ID_RANGE

    rng = random.Random(seed)
    lo, hi = TOKEN_ID_RANGE
    out = []
    for _ in range(n):
        isl = rng.randint(*isl_range)
        out.append(([rng.randrange(lo, hi) for _ in range(isl)], rng.randint(*osl_range)))
    return out


def _pcts(values: list[float]) -> dict[str, float | None]:
    from splitserve.bench.common import percentile

    ms = [v * 1000.0 for v in values]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "max": max(ms) if ms else None}


def aggregate(results: list, duration_s: float, slo_ttft_ms: float, slo_itl_ms: float) -> dict[str, Any]:
    """One (setup, rate) point from its per-request results (bench.serve.RequestResult)."""
    from splitserve.bench.common import percentile

    n = len(results)
    ok = [r for r in results if r.ok]

    def ttft_ok(r) -> bool:
        return r.ok and r.ttft is not None and r.ttft * 1000.0 <= slo_ttft_ms

    def itl_ok(r) -> bool:
        return r.ok and (r.tpot is None or r.tpot * 1000.0 <= slo_itl_ms)

    good = sum(1 for r in results if ttft_ok(r) and itl_ok(r))
    gap_p90 = [percentile(r.itls, 90) for r in ok if r.itls]
    return {
        "num_requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "duration_s": duration_s,
        "slo_attainment": good / n if n else None,
        "ttft_attainment": sum(map(ttft_ok, results)) / n if n else None,
        "itl_attainment": sum(map(itl_ok, results)) / n if n else None,
        "goodput_rps": good / duration_s if duration_s > 0 else None,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else None,
        "input_tok_s": sum(r.input_len for r in ok) / duration_s if duration_s > 0 else None,
        "ttft_ms": _pcts([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _pcts([r.tpot for r in ok if r.tpot is not None]),
        "itl_gap_p90_ms": _pcts([g for g in gap_p90 if g is not None]),
        "itl_gap_max_ms": _pcts([max(r.itls) for r in ok if r.itls]),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def request_records(results: list) -> list[dict[str, Any]]:
    """Compact per-request rows (arrival order) for the JSON, to explain a point afterwards."""
    def ms(v):
        return None if v is None else round(v * 1000.0, 1)

    return [{"start_s": round(r.start, 3), "isl": r.input_len, "osl": r.output_len, "ok": r.ok,
             "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot),
             "max_gap_ms": ms(max(r.itls)) if r.itls else None}
            for r in sorted(results, key=lambda r: r.start)]


def summarize_setup(points: list[dict[str, Any]], attainment_target: float) -> dict[str, Any]:
    """Best goodput over the rates, and the highest rate whose attainment meets the target."""
    scored = [p for p in points if p.get("goodput_rps") is not None]
    best = max(scored, key=lambda p: p["goodput_rps"], default=None)
    meeting = [p["rate_rps"] for p in points
               if p.get("slo_attainment") is not None and p["slo_attainment"] >= attainment_target]
    return {
        "goodput_rps": best["goodput_rps"] if best else 0.0,
        "goodput_at_rate_rps": best["rate_rps"] if best else None,
        "max_rate_at_target_attainment": max(meeting) if meeting else None,
    }


def goodput_ratio(disaggregated: float, aggregated: float) -> float | None:
    """disaggregated / aggregated goodput; None when the aggregated one is 0 (undefined)."""
    return disaggregated / aggregated if aggregated > 0 else None


def itl_slo_sensitivity(report: dict[str, Any], scales=ITL_SLO_SENSITIVITY) -> list[dict[str, Any]]:
    """The same requests re-scored at other ITL SLOs (scale x the calibration's solo TPOT,
    TTFT SLO unchanged): each setup's best goodput and the ratio. Shows how far the headline
    ratio depends on where the ITL SLO falls between the two setups' TPOTs."""
    slo_ttft, tpot = report["slo"]["ttft_ms"], report["calibration"]["tpot_ms"]
    out = []
    for scale in scales:
        itl = scale * tpot
        best = {}
        for name in SETUPS:
            rates = []
            for p in report[name]["rates"]:
                good = sum(1 for r in p["requests"] if r["ok"] and r["ttft_ms"] <= slo_ttft
                           and (r["tpot_ms"] is None or r["tpot_ms"] <= itl))
                rates.append(good / p["duration_s"] if p["duration_s"] > 0 else 0.0)
            best[name] = max(rates, default=0.0)
        out.append({"itl_scale": scale, "itl_ms": round(itl, 1),
                    "aggregated_goodput_rps": best["aggregated"],
                    "disaggregated_goodput_rps": best["disaggregated"],
                    "goodput_ratio": goodput_ratio(best["disaggregated"], best["aggregated"])})
    return out


def decisions_from_metrics(text: str) -> dict[str, float]:
    """splitserve_prefill_decisions_total{kind=...} counters from the frontend's /metrics."""
    out = {}
    for m in re.finditer(r'^splitserve_prefill_decisions_total\{kind="(\w+)"\}\s+([0-9.eE+-]+)',
                         text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


# -- processes ------------------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> bytes:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(url, timeout=timeout) as resp:
        return resp.read()


class ServeProcess:
    """`splitserve serve FLAGS` as a child: started and healthy on enter, SIGTERMed on exit."""

    def __init__(self, flags: list[str], workers: dict[str, int], log_path: Path,
                 ready_timeout_s: float) -> None:
        self.flags, self.workers, self.log_path = flags, workers, log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""  # base URL without /v1

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "ServeProcess":
        import json

        argv = [sys.executable, "-m", "splitserve.runtime.cli", "--log-level", "INFO", "serve",
                *self.flags]
        logger.info("starting: splitserve serve %s (log %s)", " ".join(self.flags), self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while not self.url:
                m = re.search(r"serving \S+ at (http://\S+?)/v1", self.log_tail(100_000))
                if m:
                    self.url = m.group(1)
                elif self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited with code {self.proc.returncode}:\n{self.log_tail()}")
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"serve not ready after {self.ready_timeout_s:.0f}s:\n{self.log_tail()}")
                else:
                    time.sleep(0.5)
            while True:  # serve waits for this too; check it from the outside as well
                try:
                    counts = json.loads(_get(self.url + "/health"))["workers"]
                    if all(counts.get(role, 0) >= n for role, n in self.workers.items()):
                        return self
                except (OSError, ValueError, KeyError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers not healthy after {self.ready_timeout_s:.0f}s")
                time.sleep(0.5)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            rc = proc.wait(60)
            if rc != 0:
                logger.warning("serve exited with code %s on SIGTERM", rc)
        except subprocess.TimeoutExpired:
            logger.warning("serve ignored SIGTERM for 60 s; killing it")
            proc.kill()
            proc.wait()

    def kv_transport(self) -> str | None:
        found = re.findall(r"KV transport: (\w+)", self.log_tail(10_000_000))
        return ",".join(sorted(set(found))) or None

    def prefill_decisions(self) -> dict[str, float]:
        try:
            return decisions_from_metrics(_get(self.url + "/metrics").decode())
        except OSError:
            return {}


# -- load -----------------------------------------------------------------------------------
async def drive(url: str, work: list[tuple[list[int], int]], rate: float | None, seed: int,
                timeout_s: float, desc: str | None = None) -> tuple[list, float]:
    """Send `work` as a Poisson process at `rate` (None: all at once); (results, duration)."""
    import httpx

    from splitserve.bench.serve import one_request

    base = url + "/v1"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        r = await client.get(base + "/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
        bar = None
        if desc:
            from tqdm import tqdm

            bar = tqdm(total=len(work), desc=desc, unit="req")
        rng = random.Random(seed)
        t0 = time.perf_counter()

        async def one(prompt, osl):
            res = await one_request(client, base, model, prompt, osl, t0)
            if bar is not None:
                bar.update(1)
            return res

        tasks = []
        for i, (prompt, osl) in enumerate(work):
            if i and rate:
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(one(prompt, osl)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return results, duration


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def serve_flags(name: str, cfg: DisaggBenchConfig) -> list[str]:
    flags = [*SETUPS[name], "--model", cfg.model, "--dtype", cfg.dtype,
             "--kv-cache-dtype", cfg.kv_cache_dtype, "--num-threads-per-worker", "1", "--port", "0"]
    if cfg.pin_workers:
        flags.append("--pin-workers")
    if name == "disaggregated":
        flags += ["--kv-transport", cfg.kv_transport]
        if cfg.max_prefill_queue is not None:
            flags += ["--max-prefill-queue", str(cfg.max_prefill_queue)]
        if cfg.max_local_prefill_tokens is not None:
            flags += ["--max-local-prefill-tokens", str(cfg.max_local_prefill_tokens)]
    return flags


def measure_solo(url: str, cfg: DisaggBenchConfig, count: int) -> dict[str, Any]:
    """Median TTFT and TPOT of `count` middle-length requests sent one at a time."""
    from statistics import median

    ttfts, tpots = [], []
    for i in range(count):
        work = make_requests((cfg.mid_isl,) * 2, (cfg.mid_osl,) * 2, 1, cfg.seed + 99_000 + i)
        (r,), _ = asyncio.run(drive(url, work, None, 0, cfg.request_timeout_s))
        if not r.ok or r.tpot is None:
            raise RuntimeError(f"solo request failed: {r.error}")
        ttfts.append(r.ttft * 1000.0)
        tpots.append(r.tpot * 1000.0)
    ttft = median(ttfts)
    return {"isl": cfg.mid_isl, "osl": cfg.mid_osl, "count": count, "ttft_ms": ttft,
            "tpot_ms": median(tpots), "prefill_tok_s": cfg.mid_isl / ttft * 1000.0,
            "load_avg": _load()}


def run_point(name: str, cfg: DisaggBenchConfig, logdir: Path, k: int, plan,
              solo_count: int = 1) -> dict[str, Any]:
    """One fresh `serve` of setup `name`: healthy, warmed, timed solo, then driven at rate
    number `k` of `plan(solo) -> (rates, slo)`, then stopped."""
    flags = serve_flags(name, cfg)
    point: dict[str, Any] = {}
    t_start = time.perf_counter()
    with ServeProcess(flags, SETUP_WORKERS[name], logdir / f"serve-{name}-{k}.log",
                      cfg.ready_timeout_s) as serve:
        startup_s = time.perf_counter() - t_start
        # Warm every worker (ties rotate over workers), then requests alone.
        warm = make_requests((32, 64), (4, 4), 4, cfg.seed + 99_991)
        asyncio.run(drive(serve.url, warm, None, 0, cfg.request_timeout_s))
        solo = measure_solo(serve.url, cfg, solo_count)
        rates, slo = plan(solo)
        rate = rates[k]
        work = make_requests(cfg.isl_range, cfg.osl_range, cfg.num_requests, cfg.seed * 1000 + k)
        before, load0 = serve.prefill_decisions(), _load()
        results, duration = asyncio.run(drive(
            serve.url, work, rate, cfg.seed * 1000 + k, cfg.request_timeout_s,
            desc=f"{name} {rate:.3g} rps" if cfg.progress else None))
        after = serve.prefill_decisions()
        point = {"rate_rps": rate, **aggregate(results, duration, slo["ttft_ms"], slo["itl_ms"]),
                 "solo": solo, "load_avg_start": load0, "load_avg_end": _load(),
                 "startup_s": startup_s, "url": serve.url, "requests": request_records(results)}
        if name == "disaggregated":
            point["kv_transport"] = serve.kv_transport()
            point["prefill_decisions"] = {kind: after.get(kind, 0) - before.get(kind, 0)
                                          for kind in after}
    point["wall_s"] = time.perf_counter() - t_start
    logger.info("%s @ %.3g rps: attainment %.2f (ttft %.2f, itl %.2f), goodput %.4f rps; "
                "solo TTFT %.0f ms, TPOT %.1f ms; load %s", name, rate, point["slo_attainment"],
                point["ttft_attainment"], point["itl_attainment"], point["goodput_rps"] or 0.0,
                solo["ttft_ms"], solo["tpot_ms"], point["load_avg_end"])
    return point


def run_bench(cfg: DisaggBenchConfig) -> dict[str, Any]:
    """Every (rate, setup) point on its own fresh server, setups in ABBA order over the rates
    (so a slow drift of the machine's load falls on both alike)."""
    from splitserve.bench.common import machine_info

    t0 = time.perf_counter()
    report: dict[str, Any] = {"bench": "disagg", "load_avg_start": _load()}
    chosen: dict[str, Any] = {}

    def plan(solo: dict[str, Any]):
        """Rates and SLOs: fixed by the first point's solo figures (or the flags)."""
        if not chosen:
            capacity = 1000.0 / solo["ttft_ms"]
            rates = cfg.rates or tuple(round(m * capacity, 4) for m in cfg.rate_multipliers)
            chosen.update(
                rates=tuple(rates), capacity_rps_per_worker=capacity, calibration=solo,
                slo={"ttft_ms": cfg.slo_ttft_ms or round(cfg.slo_ttft_scale * solo["ttft_ms"], 1),
                     "itl_ms": cfg.slo_itl_ms or round(cfg.slo_itl_scale * solo["tpot_ms"], 1),
                     "itl_metric": ITL_METRIC,
                     "ttft_from": "flag" if cfg.slo_ttft_ms else f"{cfg.slo_ttft_scale} x solo TTFT",
                     "itl_from": "flag" if cfg.slo_itl_ms else f"{cfg.slo_itl_scale} x solo TPOT"})
        return chosen["rates"], chosen["slo"]

    names = list(SETUPS)
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-disagg-") as tmp:
        k = 0
        while not chosen or k < len(chosen["rates"]):
            for name in (names if k % 2 == 0 else names[::-1]):
                points[name].append(run_point(name, cfg, Path(tmp), k, plan,
                                              solo_count=1 if chosen else 3))
            k += 1
    setups = {}
    for name in names:
        pts = sorted(points[name], key=lambda p: p["rate_rps"])
        setups[name] = {**summarize_setup(pts, cfg.attainment_target),
                        "serve_flags": serve_flags(name, cfg), "rates": pts}
        if name == "disaggregated":
            setups[name]["kv_transport"] = pts[0].get("kv_transport") if pts else None
    agg, dis = setups["aggregated"]["goodput_rps"], setups["disaggregated"]["goodput_rps"]
    ratio = goodput_ratio(dis, agg)
    report.update({
        "config": asdict(cfg),
        "workload": {"isl": list(cfg.isl_range), "osl": list(cfg.osl_range), "arrivals": "poisson",
                     "ignore_eos": True, "num_requests_per_rate": cfg.num_requests},
        "slo": chosen["slo"],
        "rates_rps": list(chosen["rates"]),
        "capacity_rps_per_worker": chosen["capacity_rps_per_worker"],
        "calibration": {"setup": names[0], **chosen["calibration"]},
        **setups,
        "goodput_ratio": ratio,
        "goodput_basis": GOODPUT_BASIS,
        "target_goodput_ratio": TARGET_GOODPUT_RATIO,
        "target_met": ratio is not None and ratio >= TARGET_GOODPUT_RATIO,
        "load_avg_end": _load(),
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
    })
    # DistServe's goodput: the highest rate whose attainment meets the target (on the tested
    # grid of rates, so a bound, not a point estimate); reported beside the headline.
    a_max = setups["aggregated"]["max_rate_at_target_attainment"]
    d_max = setups["disaggregated"]["max_rate_at_target_attainment"]
    report["max_rate_ratio_at_target_attainment"] = (
        d_max / a_max if a_max and d_max is not None else None)
    if ratio is None:
        report["goodput_ratio_note"] = "aggregated goodput is 0 at every rate: ratio undefined"
    report["itl_slo_sensitivity"] = itl_slo_sensitivity(report)
    return report


def plot_attainment(report: dict[str, Any], path: str) -> None:
    """SLO attainment and goodput against rate, one line per setup; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in SETUPS:
        pts = report[name]["rates"]
        xs = [p["rate_rps"] for p in pts]
        a1.plot(xs, [p["slo_attainment"] for p in pts], marker="o", label=name)
        a2.plot(xs, [p["goodput_rps"] for p in pts], marker="o", label=name)
    a1.axhline(report["config"]["attainment_target"], color="grey", linestyle=":")
    a1.set_ylim(-0.05, 1.05)
    a1.set_ylabel("SLO attainment")
    a2.set_ylabel("goodput (req/s)")
    for ax in (a1, a2):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    slo = report["slo"]
    ratio = report["goodput_ratio"]
    fig.suptitle(f"bench disagg: TTFT <= {slo['ttft_ms']:.0f} ms, TPOT <= {slo['itl_ms']:.0f} ms; "
                 f"goodput ratio {'n/a' if ratio is None else f'{ratio:.2f}'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'setup':<14}{'rate':>8}{'attain':>8}{'ttft_ok':>8}{'itl_ok':>8}{'goodput':>9}"
            f"{'ttft p50/p90 ms':>20}{'tpot p50/p90 ms':>18}{'solo ttft/tpot':>16}{'load':>7}"]
    for name in SETUPS:
        for p in report[name]["rates"]:
            t, i = p["ttft_ms"], p["itl_ms"]
            f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            rows.append(f"{name:<14}{p['rate_rps']:>8.3f}{p['slo_attainment']:>8.2f}"
                        f"{p['ttft_attainment']:>8.2f}{p['itl_attainment']:>8.2f}"
                        f"{p['goodput_rps']:>9.4f}{f(t['p50']) + '/' + f(t['p90']):>20}"
                        f"{f(i['p50']) + '/' + f(i['p90']):>18}"
                        f"{f(p['solo']['ttft_ms']) + '/' + f(p['solo']['tpot_ms']):>16}"
                        f"{p['load_avg_end'][0]:>7.1f}")
    return "\n".join(rows)


# -- CLI ------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "disagg", help="aggregated vs disaggregated serving on the same cores: SLO attainment, goodput")
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw attainment and goodput against rate (matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="2 rates (0.5x, 1x capacity), 6 requests each")
    p.add_argument("--rates", type=float, nargs="+", default=None, metavar="R",
                   help="Poisson rates in req/s (default: multiples of the measured capacity)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="TTFT SLO (default: 4 x the solo TTFT at the middle ISL)")
    p.add_argument("--slo-itl-ms", type=float, default=None,
                   help="SLO on each request's TPOT (default: 1.5 x the solo TPOT)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="measured requests per rate (default 20; --quick 6)")
    p.add_argument("--isl-range", type=int, nargs=2, default=(1024, 2048), metavar=("LO", "HI"))
    p.add_argument("--osl-range", type=int, nargs=2, default=(64, 128), metavar=("LO", "HI"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-transport", default="auto", choices=TRANSPORT_KINDS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="every worker's KV cache element type (bfloat16 with a float32 model: "
                        "half the bytes each decode step reads and each handoff moves)")
    p.add_argument("--max-prefill-queue", type=int, default=None,
                   help="disaggregated frontend's --max-prefill-queue (default: serve's)")
    p.add_argument("--max-local-prefill-tokens", type=int, default=None,
                   help="disaggregated frontend's --max-local-prefill-tokens (default: serve's; "
                        "0: every prompt to the prefill worker)")
    p.add_argument("--no-pin-workers", action="store_true",
                   help="let the OS place the workers (default: serve --pin-workers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.common import emit

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        cfg = DisaggBenchConfig(
            model=args.model, kv_transport=args.kv_transport, kv_cache_dtype=args.kv_cache_dtype,
            isl_range=tuple(args.isl_range), osl_range=tuple(args.osl_range),
            rates=tuple(args.rates) if args.rates else None,
            rate_multipliers=QUICK_RATE_MULTIPLIERS if args.quick else FULL_RATE_MULTIPLIERS,
            num_requests=args.num_requests or (6 if args.quick else 20),
            slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms,
            max_prefill_queue=args.max_prefill_queue,
            max_local_prefill_tokens=args.max_local_prefill_tokens, seed=args.seed, quick=args.quick,
            pin_workers=not args.no_pin_workers,
            progress=not args.no_progress)
    except ValueError as exc:
        print(f"splitserve bench disagg: {exc}", file=sys.stderr)
        return 2
    report = run_bench(cfg)
    if args.plot:
        try:
            plot_attainment(report, args.plot)
            report["plot"] = args.plot
        except ImportError:
            logger.error("--plot needs matplotlib (pip install matplotlib); no plot written")
    print(format_table(report), file=sys.stderr)
    emit(report, args.json_path)
    done = all(p["completed"] for name in SETUPS for p in report[name]["rates"])
    return 0 if done else 1
