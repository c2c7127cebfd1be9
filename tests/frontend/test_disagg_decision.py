"""Conditional disaggregation (frontend/disagg.choose_prefill): remote prefill only when the
prompt's uncached tokens exceed --max-local-prefill-tokens and a prefill worker's queue is
under --max-prefill-queue; 0 forces remote whenever a prefill worker exists."""

from splitserve.frontend.disagg import DisaggConfig, choose_prefill
from splitserve.frontend.worker_pool import WorkerPool
from splitserve.proto import worker_pb2


def pool_with(prefill=2, decode=1, waiting=()):
    pool = WorkerPool()
    for role, n in (("prefill", prefill), ("decode", decode)):
        for i in range(n):
            w = pool.add(f"{role[0]}{i}", role, f"127.0.0.1:{1000 + i}")
            w.healthy = True
            w.stats = worker_pb2.StatsResponse(num_free_blocks=10, num_total_blocks=10, max_model_len=4096,
                                               num_waiting=waiting[i] if role == "prefill" and i < len(waiting) else 0)
    return pool


class CachedPrefix:
    """A selector whose index says the best decode worker holds all but `uncached` tokens."""

    def __init__(self, uncached):
        self.uncached = uncached

    def __call__(self, candidates, prompt):
        return candidates[0]

    def uncached_tokens(self, prompt):
        return self.uncached


async def test_short_prompts_stay_local_long_ones_go_remote():
    pool = pool_with()
    cfg = DisaggConfig(max_local_prefill_tokens=100)
    assert await choose_prefill(pool, list(range(100)), cfg) is None
    w = await choose_prefill(pool, list(range(101)), cfg)
    assert w is not None and w.role == "prefill"


async def test_zero_threshold_forces_remote_even_for_one_token():
    w = await choose_prefill(pool_with(), [7], DisaggConfig(max_local_prefill_tokens=0))
    assert w is not None and w.role == "prefill"


async def test_cached_prefix_counts_only_uncached_tokens():
    pool = pool_with()
    pool.selector = CachedPrefix(uncached=50)
    cfg = DisaggConfig(max_local_prefill_tokens=100)
    assert await choose_prefill(pool, list(range(1000)), cfg) is None   # 950 cached on the decode side
    pool.selector = CachedPrefix(uncached=500)
    assert (await choose_prefill(pool, list(range(1000)), cfg)).role == "prefill"


async def test_full_prefill_queues_fall_back_to_local():
    cfg = DisaggConfig(max_local_prefill_tokens=10, max_prefill_queue=2)
    pool = pool_with(waiting=(2, 0))
    assert (await choose_prefill(pool, [1] * 64, cfg)).worker_id == "p1"   # p0 is full
    pool.get("p1").in_flight = 2                                          # in flight from here counts too
    assert await choose_prefill(pool, [1] * 64, cfg) is None


async def test_spill_waits_while_each_decode_worker_has_a_local_prefill():
    """A full prefill pool spills a prompt onto the decode workers only while fewer of their
    prefills are pending than there are decode workers; past that it queues remotely (the
    least-loaded prefill worker, full or not)."""
    cfg = DisaggConfig(max_local_prefill_tokens=10, max_prefill_queue=1)
    pool = pool_with(decode=2, waiting=(3, 1))
    pool.local_prefills = 1
    assert await choose_prefill(pool, [1] * 64, cfg) is None
    pool.local_prefills = 2
    assert (await choose_prefill(pool, [1] * 64, cfg)).worker_id == "p1"
    pool.mark_failed("d1")  # one healthy decode worker, one pending prefill
    pool.local_prefills = 1
    assert (await choose_prefill(pool, [1] * 64, cfg)).role == "prefill"
    pool.local_prefills = 0
    assert await choose_prefill(pool, [1] * 64, cfg) is None


async def test_zero_threshold_ignores_the_queue_limit():
    """--max-local-prefill-tokens 0 forces remote prefill whenever a prefill worker exists:
    full queues make the prompt wait there, never prefill on the decode worker."""
    cfg = DisaggConfig(max_local_prefill_tokens=0, max_prefill_queue=2)
    pool = pool_with(waiting=(2, 0))
    pool.get("p1").in_flight = 2
    w = await choose_prefill(pool, [1] * 64, cfg)
    assert w is not None and w.role == "prefill"


async def test_no_healthy_prefill_worker_means_local():
    assert await choose_prefill(pool_with(prefill=0), [1] * 64, DisaggConfig(max_local_prefill_tokens=0)) is None
    pool = pool_with(prefill=1)
    pool.mark_failed("p0")
    assert await choose_prefill(pool, [1] * 64, DisaggConfig(max_local_prefill_tokens=0)) is None


class _Call:
    """A Generate call that yields `n` responses, waiting on `gate` before the first."""

    def __init__(self, n, gate):
        self.n, self.gate, self.cancelled = n, gate, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        await self.gate.wait()
        for i in range(self.n):
            yield worker_pb2.GenerateResponse(finished=i == self.n - 1)

    def cancel(self):
        self.cancelled = True


async def test_local_prefill_counts_until_its_first_token():
    """worker_stream counts a decode worker's prefill from the local decision to the first
    token (and drops it when the stream ends before one)."""
    import asyncio
    import contextlib

    from splitserve.frontend.generation import worker_stream

    cfg = DisaggConfig(max_local_prefill_tokens=100)  # a short prompt: prefilled locally
    for closes_early in (False, True):
        pool = pool_with(prefill=1, decode=1)
        gate = asyncio.Event()
        call = _Call(3, gate)
        pool.get("d0").generate = lambda request: call
        request = worker_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3])
        stream = worker_stream(pool, request, disagg=cfg)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        assert pool.local_prefills == 1 and not first.done()
        if closes_early:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await stream.aclose()
            assert pool.local_prefills == 0 and call.cancelled
            continue
        gate.set()
        await first
        assert pool.local_prefills == 0
        assert [r.finished async for r in stream] == [False, True]
        assert pool.local_prefills == 0
