"""`splitserve bench kv-transfer`: KV pull bandwidth and per-request latency between processes.

    splitserve bench kv-transfer --json kv.json [--quick] [--prefill-tok-s X]

At the default model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, blocks of
16 tokens, bf16: 368,640 B a block, 23,040 B a token), a serving child process registers a
pool and this process pulls the blocks of 1k-, 4k- and 16k-token prompts from it — scattered
remote block ids into scattered local ids, as a fragmented block pool hands them out — timing
each `pull()` from call to return (descriptors, READ, completion, handle release, notice).
Each transport (NIXL, then the gRPC fallback) gets its own child. The peer figure is a
same-process torch copy of the same blocks (`index_select` into a staging tensor allocated once,
then `dst.index_copy_`: a gather and a scatter, on one torch thread). A
one-block pull gives the fixed cost of a pull.

`transfer_fraction_of_prefill` is the largest, over the sizes, of the NIXL pull time (p50)
divided by the prefill time of that prompt. Prefill time comes from the engine
(`AsyncEngine`, 1 torch thread, as a prefill worker runs: time to the first token of a
max_tokens=1 request) for the sizes it can run; a size beyond the engine's max_model_len (or
every size above the smallest under --quick) is extrapolated linearly from the largest
measured one, which underestimates its prefill time and so overstates the fraction. Without
an engine, `--prefill-tok-s` supplies the rate and the JSON says so.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
import uuid
from typing import Any

logger = logging.getLogger(__name__)

#: The default model's KV shape (SmolLM2-135M).
MODEL_SHAPE = {
    "model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
    "block_size": 16, "dtype": "bfloat16",
}
DEFAULT_SIZES = (1024, 4096, 16384)
#: transfer ÷ prefill the issue aims for.
TARGET_FRACTION = 0.10


def register(subparsers) -> None:
    p = subparsers.add_parser("kv-transfer", help="KV block pull bandwidth/latency (NIXL, gRPC) vs torch copy")
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--quick", action="store_true", help="fewer iterations; prefill measured at the smallest size only")
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="prompt lengths in tokens, comma-separated (default 1024,4096,16384)")
    p.add_argument("--iters", type=int, default=None, help="timed pulls per size (default 10; --quick 3)")
    p.add_argument("--transports", default="nixl,grpc", help="comma-separated: nixl,grpc")
    p.add_argument("--prefill-tok-s", type=float, default=None,
                   help="prefill rate to use when the engine cannot be run (tokens/s)")
    p.add_argument("--no-engine", action="store_true", help="do not run the engine; use --prefill-tok-s")
    p.add_argument("--prefill-threads", type=int, default=1, help="torch threads of the engine (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _block_shape() -> tuple[int, ...]:
    s = MODEL_SHAPE
    return (s["num_layers"], 2, s["block_size"], s["num_kv_heads"], s["head_dim"])


def _pool(num_blocks: int):
    """A bf16 pool whose block i holds the value i % 199 everywhere (cheap to fill and check)."""
    import torch

    pool = torch.empty((num_blocks, *_block_shape()), dtype=torch.bfloat16)
    for i in range(num_blocks):
        pool[i].fill_(i % 199)
    return pool


# -- serving child -------------------------------------------------------------------------------
def _serve_child(kind: str, num_blocks: int, cmd_conn, evt_conn) -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(kind, num_blocks, cmd_conn, evt_conn))


async def _serve(kind: str, num_blocks: int, cmd_conn, evt_conn) -> None:
    from splitserve.kv_transfer import create_transport

    transport = await create_transport(kind, f"bench-serve-{uuid.uuid4().hex[:8]}", _pool(num_blocks))
    received = 0

    async def count():
        nonlocal received
        async for _ in transport.notifications():
            received += 1

    task = asyncio.create_task(count())
    evt_conn.send(("ready", transport.kind, transport.local_metadata()))
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, cmd_conn.recv) != "stop":
        pass
    await asyncio.sleep(0.05)  # let the last notices land
    await transport.close()
    task.cancel()
    evt_conn.send(("closed", received))


class _ServeProcess:
    def __init__(self, kind: str, num_blocks: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._evt, evt_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_serve_child, args=(kind, num_blocks, cmd_r, evt_w), daemon=True)
        self.proc.start()
        cmd_r.close()
        evt_w.close()
        try:
            if not self._evt.poll(120):
                raise EOFError
            _, self.kind, self.metadata = self._evt.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeError(f"the {kind} serving process did not start (exit code {self.proc.exitcode})") from None

    def stop(self) -> int | None:
        """Stop the child; the number of notices it received."""
        received = None
        try:
            self._cmd.send("stop")
            if self._evt.poll(30):
                received = self._evt.recv()[1]
        except (OSError, EOFError):
            pass
        self.proc.join(10)
        self.kill()
        return received

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


# -- measurements --------------------------------------------------------------------------------
def _summary(times_s: list[float], nbytes: int) -> dict[str, Any]:
    from splitserve.bench.common import percentile

    p50 = percentile(times_s, 50)
    return {
        "p50_ms": p50 * 1e3, "p90_ms": percentile(times_s, 90) * 1e3, "min_ms": min(times_s) * 1e3,
        "max_ms": max(times_s) * 1e3, "mean_ms": sum(times_s) / len(times_s) * 1e3,
        "gb_per_s": nbytes / p50 / 1e9, "iters": len(times_s),
    }


def _draw_ids(rng, num_blocks: int, n: int) -> list[int]:
    return rng.sample(range(num_blocks), n)


def _check(pool, local_ids: list[int], remote_ids: list[int]) -> None:
    import torch

    for loc, rem in ((local_ids[0], remote_ids[0]), (local_ids[-1], remote_ids[-1])):
        if not torch.all(pool[loc] == rem % 199):
            raise RuntimeError(f"pulled block {rem} -> {loc} holds wrong bytes")


async def _bench_transport(kind: str, sizes: list[int], iters: int, num_blocks: int, seed: int, bar) -> dict:
    import random

    from splitserve.kv_transfer import create_transport

    server = _ServeProcess(kind, num_blocks)
    rng = random.Random(seed)
    pool = _pool(num_blocks)
    client = await create_transport(kind, f"bench-pull-{uuid.uuid4().hex[:8]}", pool)
    out: dict[str, Any] = {"transport": client.kind, "sizes": {}}
    sent = 0
    try:
        if client.kind != kind or server.kind != kind:
            raise RuntimeError(f"asked for {kind}, got {client.kind}/{server.kind}")
        peer = await client.add_peer(server.metadata)
        t0 = time.perf_counter()
        await client.pull(peer, [0], [0], notify_msg=b"warmup", timeout_s=60)  # connection setup
        out["first_pull_ms"] = (time.perf_counter() - t0) * 1e3
        sent += 1
        one = []
        for _ in range(2 * iters):  # fixed cost of a pull: one block
            i, j = rng.randrange(num_blocks), rng.randrange(num_blocks)
            t0 = time.perf_counter()
            await client.pull(peer, [i], [j], notify_msg=b"one-%d" % sent, timeout_s=60)
            one.append(time.perf_counter() - t0)
            sent += 1
        out["one_block_pull"] = _summary(one, pool[0].nbytes)
        for tokens in sizes:
            n = math.ceil(tokens / MODEL_SHAPE["block_size"])
            nbytes = n * pool[0].nbytes
            times = []
            for it in range(iters + 1):  # the first of each size is a warm-up
                remote_ids, local_ids = _draw_ids(rng, num_blocks, n), _draw_ids(rng, num_blocks, n)
                t0 = time.perf_counter()
                await client.pull(peer, remote_ids, local_ids, notify_msg=b"pulled-%d" % sent, timeout_s=120)
                dt = time.perf_counter() - t0
                sent += 1
                _check(pool, local_ids, remote_ids)
                if it:
                    times.append(dt)
                bar.update(1)
            contiguous = []
            if kind == "nixl":  # the same bytes as one run on both sides (best case, for reference)
                for _ in range(max(1, iters // 2)):
                    t0 = time.perf_counter()
                    await client.pull(peer, range(n), range(n), timeout_s=120)
                    contiguous.append(time.perf_counter() - t0)
            out["sizes"][tokens] = {"scattered": _summary(times, nbytes)}
            if contiguous:
                out["sizes"][tokens]["contiguous"] = _summary(contiguous, nbytes)
    finally:
        await client.close()
        received = server.stop()
    out["notices"] = {"sent": sent, "received": received}
    return out


def _bench_torch_copy(sizes: list[int], iters: int, num_blocks: int, seed: int) -> dict:
    import random

    import torch

    rng = random.Random(seed)
    src, dst = _pool(num_blocks), _pool(num_blocks)
    out: dict[Any, Any] = {}
    threads = torch.get_num_threads()
    # One thread, as each worker runs (and as the pull's copy runs): with two OpenMP threads
    # on a shared 2-core box index_select of bf16 blocks stalls for hundreds of ms.
    torch.set_num_threads(1)
    try:
        _torch_copy_sizes(out, src, dst, rng, sizes, iters, num_blocks)
    finally:
        torch.set_num_threads(threads)
    return out


def _torch_copy_sizes(out, src, dst, rng, sizes, iters, num_blocks) -> None:
    import torch

    for tokens in sizes:
        n = math.ceil(tokens / MODEL_SHAPE["block_size"])
        stage = torch.zeros((n, *_block_shape()), dtype=torch.bfloat16)  # allocated (and touched) once
        times = []
        for it in range(iters + 1):
            r = torch.tensor(_draw_ids(rng, num_blocks, n))
            loc = torch.tensor(_draw_ids(rng, num_blocks, n))
            t0 = time.perf_counter()
            torch.index_select(src, 0, r, out=stage)  # gather ...
            dst.index_copy_(0, loc, stage)  # ... and scatter: the same bytes a pull moves
            dt = time.perf_counter() - t0
            if it:
                times.append(dt)
        out[tokens] = {**_summary(times, n * src[0].nbytes), "torch_threads": 1}


async def _measure_prefill_engine(sizes: list[int], quick: bool, threads: int, seed: int) -> dict:
    import random

    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.sampling_params import SamplingParams

    engine = AsyncEngine(EngineConfig(model=MODEL_SHAPE["model"], dtype=MODEL_SHAPE["dtype"], num_threads=threads))
    await engine.start()
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def prefill_s(n: int) -> float:
        ids = [rng.randrange(300, 20_000) for _ in range(n)]  # fresh ids: no prefix-cache hits
        t0 = time.perf_counter()
        async for _ in engine.generate(f"bench-prefill-{uuid.uuid4().hex}", ids, params):
            break
        return time.perf_counter() - t0

    try:
        await prefill_s(32)  # warm-up
        limit = engine.max_model_len - 1
        runnable = sorted(s for s in sizes if s <= limit)
        if quick:
            runnable = runnable[:1]
        measured = {}
        for s in runnable:
            measured[s] = await prefill_s(s)
            logger.info("prefill of %d tokens: %.2f s", s, measured[s])
    finally:
        await engine.shutdown()
    if not measured:
        raise RuntimeError(f"no size fits the engine's max_model_len ({engine.max_model_len})")
    largest = max(measured)
    rate = largest / measured[largest]
    per_size = {}
    for s in sizes:
        if s in measured:
            per_size[s] = {"prefill_ms": measured[s] * 1e3, "how": "measured"}
        else:
            per_size[s] = {"prefill_ms": s / rate * 1e3, "how": f"extrapolated linearly from {largest} tokens"}
    return {
        "source": "engine", "engine_threads": threads, "max_model_len": engine.max_model_len,
        "tok_s_at_largest_measured": rate, "per_size": per_size,
    }


async def measure_prefill(sizes: list[int], args) -> dict:
    """Prefill time of each size: the engine when it runs, else --prefill-tok-s, else none."""
    reason = "--no-engine"
    if not args.no_engine:
        try:
            return await _measure_prefill_engine(sizes, args.quick, args.prefill_threads, args.seed)
        except Exception as exc:  # noqa: BLE001 - engine absent, model missing, ...
            reason = f"engine unavailable: {type(exc).__name__}: {exc}"
            logger.warning("prefill timing: %s", reason)
    if args.prefill_tok_s:
        return {
            "source": "--prefill-tok-s", "note": f"prefill rate given on the command line ({reason})",
            "per_size": {s: {"prefill_ms": s / args.prefill_tok_s * 1e3, "how": "--prefill-tok-s"} for s in sizes},
        }
    return {"source": "none", "note": f"{reason}; pass --prefill-tok-s to get transfer_fraction_of_prefill",
            "per_size": {}}


async def _main(args) -> dict:
    from tqdm import tqdm

    from splitserve.bench.common import machine_info

    sizes = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit("--sizes needs positive token counts")
    kinds = [k.strip() for k in str(args.transports).split(",") if k.strip()]
    unknown = set(kinds) - {"nixl", "grpc"}
    if unknown:
        raise SystemExit(f"--transports: unknown {sorted(unknown)}")
    iters = args.iters or (3 if args.quick else 10)
    if iters < 1:
        raise SystemExit("--iters must be >= 1")
    max_blocks = math.ceil(max(sizes) / MODEL_SHAPE["block_size"])
    num_blocks = max_blocks + max_blocks // 4 + 16  # room to scatter the ids
    block_bytes = math.prod(_block_shape()) * 2

    result: dict[str, Any] = {
        "benchmark": "kv-transfer",
        "machine": machine_info(),
        "model_shape": {**MODEL_SHAPE, "block_bytes": block_bytes, "bytes_per_token": block_bytes // MODEL_SHAPE["block_size"]},
        "config": {"quick": bool(args.quick), "iters": iters, "sizes_tokens": sizes, "pool_blocks": num_blocks,
                   "block_ids": "scattered (random remote and local ids)", "transports": kinds,
                   "timed": "pull() call to return: descriptors, READ, completion, release, notice"},
    }
    transports: dict[str, Any] = {}
    with tqdm(total=len(kinds) * len(sizes) * (iters + 1), desc="kv pulls", unit="pull", leave=False) as bar:
        for kind in kinds:
            try:
                transports[kind] = await _bench_transport(kind, sizes, iters, num_blocks, args.seed, bar)
            except Exception as exc:  # noqa: BLE001 - e.g. NIXL missing: report, go on
                logger.warning("%s transport benchmark failed: %s", kind, exc)
                transports[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    torch_copy = _bench_torch_copy(sizes, iters, num_blocks, args.seed)
    prefill = await measure_prefill(sizes, args)

    rows = []
    primary = next((k for k in kinds if "sizes" in transports.get(k, {})), None)
    for tokens in sizes:
        row: dict[str, Any] = {"tokens": tokens, "blocks": math.ceil(tokens / MODEL_SHAPE["block_size"])}
        row["bytes"] = row["blocks"] * block_bytes
        for kind in kinds:
            if "sizes" in transports[kind]:
                row[kind] = transports[kind]["sizes"][tokens]["scattered"]
                if "contiguous" in transports[kind]["sizes"][tokens]:
                    row[f"{kind}_contiguous"] = transports[kind]["sizes"][tokens]["contiguous"]
        row["torch_copy"] = torch_copy[tokens]
        pf = prefill["per_size"].get(tokens)
        if pf:
            row["prefill_ms"], row["prefill_how"] = pf["prefill_ms"], pf["how"]
            for kind in kinds:
                if kind in row:
                    row[f"{kind}_fraction_of_prefill"] = row[kind]["p50_ms"] / pf["prefill_ms"]
        if primary and primary in row and "torch_copy" in row:
            row[f"{primary}_vs_torch_copy"] = row[primary]["p50_ms"] / row["torch_copy"]["p50_ms"]
        rows.append(row)
    result["sizes"] = rows
    result["transports"] = {k: {kk: vv for kk, vv in v.items() if kk != "sizes"} for k, v in transports.items()}
    result["prefill"] = {k: v for k, v in prefill.items() if k != "per_size"}
    fractions = [r[f"{primary}_fraction_of_prefill"] for r in rows if primary and f"{primary}_fraction_of_prefill" in r]
    result["transfer_fraction_of_prefill"] = max(fractions) if fractions else None
    result["transfer_fraction_transport"] = primary
    if "grpc" in kinds and primary != "grpc":
        g = [r["grpc_fraction_of_prefill"] for r in rows if "grpc_fraction_of_prefill" in r]
        result["transfer_fraction_of_prefill_grpc"] = max(g) if g else None
    result["transfer_fraction_target"] = TARGET_FRACTION
    return result


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.common import emit

    result = asyncio.run(_main(args))
    emit(result, args.json_path)
    return 0
