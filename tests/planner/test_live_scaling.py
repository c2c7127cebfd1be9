"""Live: the SLO planner with the `local` connector scales the decode pool of a running
`splitserve serve` 1 -> 2 under a load step and back to 1 after it, end to end.

Real processes on loopback: `splitserve profile` measures this machine (a small grid,
~10 s), `splitserve serve --decode-workers 1 --discovery embedded://<unique>` serves the
default model, and the test runs the planner loop in-process (`Planner` + `LocalConnector` +
`PrometheusObserver`, 2.5 s ticks) while an async `openai` client sends a load step. The
ITL target is the profiled single-sequence ITL, so one decode worker is planned for about
one stream's worth of tokens/s (`cap`); the load step asks for twice that (at least 1.2
req/s of 64 tokens). The frontend's
`/health` worker count is the ground truth for "decode workers".

The test can fail: before the load the pool must stay at 1 for several ticks (an idle
planner that scales up anyway fails), the second worker must show up in `/health` while
the load runs and stay until it ends, every request must succeed (the drained worker may
not drop any), and
the pool must be back at 1 — with `serve`'s own worker untouched — within bounded waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytestmark = [pytest.mark.live, pytest.mark.slow]

MODEL = "smollm2-135m"
# 256 MiB of KV cache a worker (~350 blocks, ~30 requests of this test at once): the router
# refuses a worker past 95 % of its blocks (503), and on a slow hour of this shared host the
# one worker of the load step's first seconds held more than 64 MiB's ~8 requests.
ENGINE = ["--dtype", "auto", "--kv-cache-memory", "256MiB", "--max-model-len", "1024"]
OSL = 64
INTERVAL_S = 2.5
PROMPT = (
    "The planner watches the frontend's metrics and decides how many decode workers the "
    "deployment needs. Under a steady stream of requests each worker batches the sequences "
    "it decodes, and the inter-token latency grows with the batch. When the latency target "
    "allows only a few sequences per worker, more workers are needed to carry the load; "
    "when the load goes away, the extra workers are drained and stopped. Request"
)
# Bounded waits (seconds), generous for a shared 2-core machine.
SERVE_READY_S = 120
BASELINE_TICKS = 3
SCALE_UP_WITHIN_S = 100  # load start -> a 2nd decode worker in /health
LOAD_AFTER_UP_S = 6  # keep the load on this long once both workers serve
SCALE_DOWN_WITHIN_S = 60  # load end -> back to 1 in /health


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitserve.runtime.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _health(base: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base + "/health", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:  # 503 without decode workers still has a body
        return json.load(exc)


class _Serve:
    """`splitserve serve` in its own session; stdout drained by a thread."""

    def __init__(self, discovery: str) -> None:
        self.proc = subprocess.Popen(
            _cli("--log-level", "WARNING", "serve", "--decode-workers", "1", "--discovery", discovery,
                 "--port", "0", "--num-threads-per-worker", "1", *ENGINE),
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env(), start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"serving .* at (http://\S+)/v1", line)
            if m:
                return m.group(1)
        raise AssertionError(f"splitserve serve not serving within {timeout}s (exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc.stdout.close()


class _HealthLog:
    """Samples the frontend's decode worker count every 0.25 s: [(t, decode)]."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.samples.append((time.monotonic(), int(_health(self.base)["workers"].get("decode", 0))))
            except (OSError, ValueError, KeyError):
                pass

    def decode(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def wait(self, pred, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and pred(self.samples[-1][1]):
                return self.samples[-1][0]
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout}s; last samples {self.samples[-5:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def _load_step(base: str, rate: float, health: _HealthLog, results: list) -> tuple[float, float | None]:
    """Send `rate` req/s until 2 decode workers served for LOAD_AFTER_UP_S (bounded); wait for all.

    Returns (when the load ended, when /health first counted 2 decode workers or None).
    """
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=90)

    async def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            r = await client.completions.create(
                model=MODEL, prompt=f"{PROMPT} {i}:", max_tokens=OSL, temperature=0,
                extra_body={"ignore_eos": True},
            )
            results.append(("ok", r.usage.completion_tokens, time.monotonic() - t0))
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            results.append(("error", repr(exc), time.monotonic() - t0))

    tasks: list[asyncio.Task] = []
    start = time.monotonic()
    up_at: float | None = None
    i = 0
    try:
        while True:
            now = time.monotonic()
            if up_at is None and health.decode() == 2:
                up_at = now
            if up_at is not None and now - up_at >= LOAD_AFTER_UP_S:
                break
            if now - start > SCALE_UP_WITHIN_S:
                break
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        end = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
    return end, up_at


def test_decode_pool_follows_a_load_step(tmp_path):
    try:
        from splitserve.engine.model_loader import default_model_path

        default_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model not installed: {exc}")
    from splitserve.planner.config import PlannerConfig
    from splitserve.planner.connectors.local import LocalConnector, LocalConnectorConfig
    from splitserve.planner.core import Planner
    from splitserve.planner.loop import run_loop
    from splitserve.planner.observe import PrometheusObserver
    from splitserve.planner.profile import load_profile
    from splitserve.planner.sla_math import decode_capacity, decode_context, size_pools
    from splitserve.runtime.discovery.embedded import deployment_dir, embedded_url

    t_begin = time.monotonic()
    # 1. profile this machine (small grid; the engine settings of the workers)
    profile_path = tmp_path / "profile.json"
    subprocess.run(
        _cli("--log-level", "WARNING", "profile", "--isl", "64", "128", "--batch", "1", "2", "4",
             "--context", "128", "256", "--decode-steps", "6", "--kv-cache-memory", "64MiB", "--json",
             str(profile_path)),
        check=True, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=180,
    )
    profile = load_profile(profile_path)
    # Requests are ~100 prompt tokens + OSL generated: decode context ~ the grid's first column.
    isl = 100.0
    ctx = decode_context(isl, OSL)
    itl_ms = float(profile.decode_itl_ms(1, ctx)) * 1.01
    cap = decode_capacity(profile, ctx, itl_ms)  # one decode worker at the target
    # Twice one worker's planned tokens/s; at least 1.2 req/s, so each 2.5 s tick sees a few
    # completions even when the profile was measured in a busy moment (a tiny rate
    # quantises to 0-or-1 completion per tick).
    # (64-token outputs: with the quantized kernels one stream is ~130 tok/s here, so at the
    # 6 req/s cap 32-token requests no longer asked for two workers.)
    rate = min(6.0, max(1.2, 2.0 * cap.tok_s / OSL))
    plan = size_pools(profile, rps=rate, isl=isl, osl=OSL, ttft_ms=10_000, itl_ms=itl_ms)
    assert plan.decode_replicas >= 2, (cap, rate)  # the load step needs two workers on paper
    assert size_pools(profile, rps=0.0, isl=isl, osl=OSL, ttft_ms=10_000, itl_ms=itl_ms).decode_replicas <= 1

    # 2. serve: 1 decode worker + frontend, meeting in a discovery of our own
    name = f"live-scaling-{os.getpid()}-{secrets.token_hex(3)}"
    discovery = embedded_url(name)
    serve = _Serve(discovery)
    health = connector = loop_thread = None
    stop = threading.Event()
    decisions: list[tuple[float, object]] = []
    try:
        base = serve.wait_url(SERVE_READY_S)
        health = _HealthLog(base)
        health.wait(lambda n: n == 1, 30, "serve's decode worker in /health")
        serve_pids = _serve_worker_pids(serve.proc.pid)
        assert serve_pids, "serve's own worker processes not found"

        # 3. the planner loop, in-process
        # A 3-tick moving average bridges a tick with no completion; corrections are off
        # because the profile and the load run at different moments of this shared machine
        # (how busy it is swings the ITL 3x), and they are covered by the core's unit tests.
        config = PlannerConfig(
            ttft_ms=10_000, itl_ms=itl_ms, interval_s=INTERVAL_S, predictor="moving-average",
            predictor_window=3, headroom_quantile=None, scale_down_ticks=2, min_prefill_replicas=0,
            min_decode_replicas=1, max_decode_replicas=2, default_isl=isl, default_osl=OSL,
            use_corrections=False,
        )
        connector = LocalConnector(LocalConnectorConfig(
            discovery_url=discovery, worker_args=("--model", MODEL, *ENGINE), threads_per_worker=1,
            max_workers=2, roles=("decode",), min_decode_workers=1, log_level="WARNING",
            ready_timeout_s=120, stop_timeout_s=30,
        ))
        assert connector.current() == (0, 1)  # serve's worker counts
        observer = PrometheusObserver([base + "/metrics"], timeout_s=5)
        loop_thread = threading.Thread(
            target=run_loop, args=(Planner(config, load_profile(profile_path)), observer, connector),
            kwargs={"interval_s": INTERVAL_S, "stop": stop,
                    "on_decision": lambda d: decisions.append((time.monotonic(), d))},
            name="planner-loop", daemon=True,
        )
        loop_thread.start()

        # 4. idle: the planner must keep 1 decode worker
        deadline = time.monotonic() + BASELINE_TICKS * INTERVAL_S * 4
        while len(decisions) < BASELINE_TICKS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(decisions) >= BASELINE_TICKS, "the planner loop does not tick"
        assert [d.decode_replicas for _, d in decisions] == [1] * len(decisions)
        assert health.decode() == 1

        # 5. the load step
        results: list = []
        load_start = time.monotonic()
        load_end, up_at = asyncio.run(_load_step(base, rate, health, results))
        errors = [r for r in results if r[0] != "ok"]
        assert not errors, errors[:5]
        assert all(r[1] == OSL for r in results)
        assert up_at is not None, (
            f"no 2nd decode worker within {SCALE_UP_WITHIN_S}s of load at {rate:.2f} req/s; "
            f"decisions: {[(round(t - load_start, 1), d.decode_replicas, d.wanted_decode, round(d.predicted_rps, 2)) for t, d in decisions]}"
        )
        assert load_start < up_at < load_end
        during = [n for t, n in health.samples if up_at <= t <= load_end]
        assert during and min(during) == 2, f"the pool flapped during the load: {during}"
        scale_up = next(d for _, d in decisions if d.decode_replicas == 2)
        assert scale_up.wanted_decode >= 2 and scale_up.predicted_rps > 0

        # 6. after the load: back to 1, and it is the planner's worker that went
        down_at = health.wait(lambda n: n == 1, SCALE_DOWN_WITHIN_S, "scale back to 1 decode worker")
        assert down_at > load_end
        deadline = time.monotonic() + 40
        while connector.workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert connector.workers() == []  # drained and exited
        assert serve.proc.poll() is None and all(_alive(p) for p in serve_pids)
        assert decisions[-1][1].decode_replicas == 1
        print(
            f"\nlive scaling: profile+serve {load_start - t_begin:.0f}s, load {rate:.2f} req/s x {OSL} tok "
            f"({len(results)} requests), 1->2 after {up_at - load_start:.1f}s, load ran {load_end - load_start:.1f}s, "
            f"2->1 {down_at - load_end:.1f}s after it; itl target {itl_ms:.1f} ms, cap {cap.tok_s:.1f} tok/s/worker"
        )
    finally:
        stop.set()
        if loop_thread is not None:
            loop_thread.join(60)  # run_loop closes the connector: own workers drain and stop
        elif connector is not None:
            connector.close()
        if health is not None:
            health.close()
        serve.stop()
        shutil.rmtree(deployment_dir(name).parent, ignore_errors=True)


def _serve_worker_pids(serve_pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == serve_pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    from splitserve.planner.connectors.local import pid_alive

    return pid_alive(pid)
