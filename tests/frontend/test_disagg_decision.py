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
