"""Router end to end on simulated workers: choice, busy skipping, route plans, no leaks."""

import random

import pytest

from splitserve.engine.outputs import EngineStats
from splitserve.router import (
    BlockSizeMismatch,
    EventGap,
    NoWorkerAvailable,
    Role,
    Router,
    RouterConfig,
    UnknownWorker,
)
from splitserve.router.events import KvEventPublisher

BS = 4


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Worker:
    """A simulated worker: an unbounded prefix cache that publishes KV events."""

    def __init__(self, router, wid, pool="decode", total_blocks=1000):
        self.wid = wid
        self.cache: set[int] = set()
        router.add_worker(wid, pool, block_size=BS, total_blocks=total_blocks)
        self.pub = KvEventPublisher(wid, BS, router.apply_events,
                                    snapshot_source=lambda: list(self.cache))

    def prefill(self, router, tokens):
        hs = router.hash_tokens(tokens)
        new = [h for h in hs if h not in self.cache]
        self.cache.update(hs)
        self.pub.on_stored(new, None)
        self.pub.flush()


def make(n=3, prefill=0, clock=None, **cfg):
    router = Router(RouterConfig(block_size=BS, **cfg), rng=random.Random(0),
                    clock=clock or Clock())
    dec = [Worker(router, f"d{i}") for i in range(n)]
    pre = [Worker(router, f"p{i}", "prefill") for i in range(prefill)]
    return router, dec, pre


def prompt(seed, n=64):
    r = random.Random(seed)
    return [r.randrange(1000) for _ in range(n)]


def test_repeated_prefix_lands_on_the_worker_holding_it():
    router, workers, _ = make(3)
    system = prompt(1, 48)
    first = router.select(system + prompt(2, 16), request_id="r0")
    workers[int(first.worker_id[1])].prefill(router, system + prompt(2, 16))
    router.on_first_token("r0")
    router.on_finished("r0")
    for i in range(1, 6):
        sel = router.select(system + prompt(100 + i, 16), request_id=f"r{i}")
        assert sel.worker_id == first.worker_id
        assert sel.overlap_blocks == 12
        router.on_finished(f"r{i}")
    assert router.metrics()["prefix_hit_rate"] > 0.5
    assert router.load.num_requests() == 0


def test_load_spreads_distinct_prompts():
    router, _, _ = make(3)
    chosen = [router.select(prompt(i), request_id=f"r{i}").worker_id for i in range(6)]
    assert sorted(chosen) == ["d0", "d0", "d1", "d1", "d2", "d2"]
    for i in range(6):
        router.on_finished(f"r{i}")
    assert router.load.num_requests() == 0


def test_select_without_request_id_books_nothing():
    router, _, _ = make(2)
    for _ in range(3):
        assert router.select(prompt(0)).worker_id in ("d0", "d1")
    assert router.load.num_requests() == 0
    assert router.load.view("d0").active_blocks == 0


def test_busy_workers_are_skipped_then_503():
    router, _, _ = make(2, max_active_blocks_frac=0.5, retry_after_s=2.5)
    router.update_stats("d0", EngineStats(0, 3, 100, 1000, BS))      # 90% used
    for i in range(3):
        assert router.select(prompt(i)).worker_id == "d1"
    router.update_stats("d1", EngineStats(0, 3, 400, 1000, BS))      # 60% used
    with pytest.raises(NoWorkerAvailable) as err:
        router.select(prompt(0))
    assert err.value.retry_after_s == 2.5
    assert router.metrics()["no_worker"] == 1


def test_queue_limit_skips_workers():
    router, _, _ = make(2, max_queue=2)
    sels = [router.select(prompt(i), request_id=f"r{i}") for i in range(4)]
    with pytest.raises(NoWorkerAvailable):
        router.select(prompt(9), request_id="r9")
    router.on_first_token("r0")                                      # one queue drains
    assert router.select(prompt(9), request_id="r9").worker_id == sels[0].worker_id


def test_empty_pool_and_exclude():
    router = Router(RouterConfig(block_size=BS))
    with pytest.raises(NoWorkerAvailable):
        router.select(prompt(0))
    router, _, _ = make(2)
    assert router.select(prompt(0), exclude={"d0"}).worker_id == "d1"
    with pytest.raises(NoWorkerAvailable):
        router.select(prompt(0), exclude={"d0", "d1"})
    with pytest.raises(NoWorkerAvailable):
        router.select(prompt(0), Role.PREFILL)                       # no prefill pool


def test_add_worker_block_size_mismatch_leaves_router_unchanged():
    router = Router(RouterConfig(block_size=16))
    with pytest.raises(BlockSizeMismatch):
        router.add_worker("w", "decode", block_size=32)
    assert router.workers() == [] and "w" not in router.load
    with pytest.raises(ValueError):
        router.add_worker("w", "bogus", block_size=16)
    with pytest.raises(UnknownWorker):
        router.update_stats("w", EngineStats(0, 0, 1, 1, 16))


def test_event_gap_then_snapshot_through_the_router():
    router = Router(RouterConfig(block_size=BS))
    router.add_worker("d0", block_size=BS)
    cache: set[int] = set()
    lossy = {"drop": False}

    def stream(data):
        if not lossy["drop"]:
            router.apply_events(data)

    pub = KvEventPublisher("d0", BS, stream, snapshot_source=lambda: list(cache))

    def store(tokens):
        cache.update(router.hash_tokens(tokens))
        pub.on_stored(router.hash_tokens(tokens), None)
        pub.flush()

    store(prompt(0))
    lossy["drop"] = True                                              # the stream loses a batch
    store(prompt(1))
    lossy["drop"] = False
    with pytest.raises(EventGap):
        store(prompt(2))
    assert router.find_matches(prompt(1)) == {}
    router.load_snapshot(pub.snapshot())
    for s in range(3):
        assert router.find_matches(prompt(s)) == {"d0": 16}


def test_select_aggregated_books_prefill_on_the_decode_worker():
    router, _, _ = make(2)
    sel = router.select(prompt(0), Role.AGGREGATED, request_id="r")
    assert sel.role is Role.AGGREGATED
    view = router.load.view(sel.worker_id)
    assert view.prefill_tokens == 64 and view.active_blocks == 16
    router.on_finished("r")
    assert router.load.num_requests() == 0
    assert router.metrics()["remote_prefills"] == 0


def test_select_prefill_then_decode_books_each_pool_its_part():
    router, dec, pre = make(2, prefill=2)
    p = router.select(prompt(0), Role.PREFILL, request_id="r")
    d = router.select(prompt(0), Role.DECODE, request_id="r")
    assert p.worker_id.startswith("p") and d.worker_id.startswith("d")
    pv, dv = router.load.view(p.worker_id), router.load.view(d.worker_id)
    assert (pv.prefill_tokens, dv.prefill_tokens, dv.active_blocks) == (64, 0, 16)
    router.on_first_token("r")
    assert router.load.view(p.worker_id).active_blocks == 0
    router.on_finished("r")
    assert router.load.num_requests() == 0
    m = router.metrics()
    assert (m["remote_prefills"], m["requests"]) == (1, 1)


def test_prefill_pool_prefers_overlap_decode_pool_prefers_load():
    router, dec, pre = make(2, prefill=2)
    long = prompt(3, 200)
    pre[1].prefill(router, long)
    dec[0].prefill(router, long)
    router.update_stats("d0", EngineStats(0, 4, 700, 1000, BS))      # d0 is loaded
    p = router.select(long + prompt(4, 8), Role.PREFILL, request_id="r")
    assert p.worker_id == "p1" and p.overlap_blocks == 50
    assert router.select(long + prompt(4, 8), Role.DECODE, request_id="r").worker_id == "d1"
    # Same load on both decode workers: the one holding the prefix wins the tie.
    router.update_stats("d0", EngineStats(0, 0, 1000 - 17, 1000, BS))
    assert router.select(long, Role.DECODE).worker_id == "d0"


def test_temperature_sampling_deterministic_with_seed():
    def picks(seed):
        router = Router(RouterConfig(block_size=BS, temperature=1.0), rng=random.Random(seed))
        for i in range(4):
            router.add_worker(f"w{i}", block_size=BS)
        return [router.select(prompt(i), request_id=f"r{i}").worker_id for i in range(30)]

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)
    router = Router(RouterConfig(block_size=BS, mode="random", seed=11))
    router2 = Router(RouterConfig(block_size=BS, mode="random", seed=11))
    for r in (router, router2):
        for i in range(4):
            r.add_worker(f"w{i}", block_size=BS)
    assert [router.select(prompt(0)).worker_id for _ in range(20)] == [
        router2.select(prompt(0)).worker_id for _ in range(20)]


def test_approximate_worker_remembers_routing_until_ttl():
    clock = Clock()
    router = Router(RouterConfig(block_size=BS, approx_ttl_s=30.0), clock=clock)
    for i in range(3):
        router.add_worker(f"w{i}", block_size=BS, approximate=True)
    first = router.select(prompt(0), request_id="a").worker_id
    router.on_finished("a")
    for i in range(3):
        sel = router.select(prompt(0) + prompt(i + 50, 4), request_id=f"b{i}")
        assert sel.worker_id == first and sel.overlap_blocks == 16
        router.on_finished(f"b{i}")
    clock.t += 31.0
    assert router.find_matches(prompt(0)) == {}
    assert router.index.num_blocks == 0


def test_remove_worker_drops_blocks_and_load():
    router, workers, _ = make(2)
    workers[0].prefill(router, prompt(0))
    router.select(prompt(0), request_id="r")
    router.remove_worker("d0")
    assert router.workers() == ["d1"] and router.index.num_blocks == 0
    assert router.select(prompt(0)).worker_id == "d1"
    router.remove_worker("d0")                                        # twice: no-op
    router.on_finished("r")
    assert router.load.num_requests() == 0


def test_busy_from_stats_only_while_they_are_fresh():
    clock = Clock()
    router, _, _ = make(1, clock=clock, stats_ttl_s=5.0, max_queue=2)
    router.update_stats("d0", EngineStats(4, 0, 1000, 1000, BS))      # 4 waiting
    with pytest.raises(NoWorkerAvailable):
        router.select(prompt(0))
    clock.t += 6.0                                                     # stats went stale
    assert router.select(prompt(0)).worker_id == "d0"


def test_precomputed_hashes_give_the_same_choice():
    router, workers, _ = make(3)
    workers[2].prefill(router, prompt(0, 40))
    toks = prompt(0, 40) + prompt(1, 24)
    a = router.select(toks)
    b = router.select(toks, block_hashes=router.hash_tokens(toks))
    assert (a.worker_id, a.overlap_blocks, a.num_blocks) == (b.worker_id, b.overlap_blocks,
                                                             b.num_blocks) == ("d2", 10, 16)
