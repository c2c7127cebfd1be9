"""The event plane over gRPC on loopback: subscribe, snapshot, events, stats, resync."""

import asyncio
import random
import threading

import grpc
import pytest

from splitserve.engine.outputs import EngineStats
from splitserve.router import BlockSizeMismatch, Router, RouterConfig
from splitserve.router.service import KvEventServer, KvEventSubscriber

BS = 4


def prompt(seed, n=32):
    r = random.Random(seed)
    return [r.randrange(1000) for _ in range(n)]


async def wait_for(cond, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class FakeWorker:
    """A worker's prefix cache publishing through a KvEventServer on a loopback port."""

    def __init__(self, wid="w0", bs=BS, stats_interval_s=0.02, num_waiting=1, free_blocks=70,
                 **kw):
        self.cache: set[int] = set()
        self.bs = bs
        self.events = KvEventServer(
            wid, bs, snapshot_source=lambda: list(self.cache),
            stats_source=lambda: EngineStats(num_waiting, 2, free_blocks, 100, bs), total_blocks=100,
            flush_interval_s=0.002, stats_interval_s=stats_interval_s, **kw)
        self.server = grpc.aio.server()
        self.events.attach(self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def start(self):
        await self.server.start()
        await self.events.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self):
        await self.events.stop()
        await self.server.stop(0)

    def store(self, router, tokens, flush=False):
        hs = router.hash_tokens(tokens)
        self.cache.update(hs)
        self.events.publisher.on_stored(hs, None)
        if flush:
            self.events.publisher.flush()

    def evict(self, router, tokens):
        hs = router.hash_tokens(tokens)
        self.cache.difference_update(hs)
        self.events.publisher.on_removed(hs)


def new_router(bs=BS):
    return Router(RouterConfig(block_size=bs))


async def test_subscribe_snapshot_events_stats_and_leave():
    router = new_router()
    w = FakeWorker()
    w.store(router, prompt(0))                      # before anyone subscribes: via snapshot
    target = await w.start()
    sub = KvEventSubscriber(router, target, "decode", expected_worker_id="w0")
    sub.start()
    try:
        await asyncio.wait_for(sub.ready.wait(), 5)
        assert router.workers("decode") == ["w0"]
        assert router.find_matches(prompt(0)) == {"w0": 8}
        # The engine thread publishes; the flush timer sends.
        t = threading.Thread(target=lambda: [w.store(router, prompt(s)) for s in range(1, 20)])
        t.start()
        t.join()
        await wait_for(lambda: router.find_matches(prompt(19)) == {"w0": 8})
        w.evict(router, prompt(3))
        await wait_for(lambda: router.find_matches(prompt(3)) == {})
        assert router.index.num_worker_blocks("w0") == len(w.cache)
        await wait_for(lambda: router.load.view("w0").num_waiting == 1)   # stats arrived
        assert router.load.view("w0").active_blocks == 30
        assert sub.resyncs == 0
        await w.stop()                              # stream ends: the worker leaves
        await wait_for(lambda: router.workers() == [])
        assert router.index.num_blocks == 0
    finally:
        await sub.stop()
        await w.stop()


async def test_block_size_mismatch_refused_at_subscribe():
    router = new_router(bs=16)
    w = FakeWorker(bs=BS)
    target = await w.start()
    sub = KvEventSubscriber(router, target)
    try:
        with pytest.raises(BlockSizeMismatch) as err:
            await asyncio.wait_for(sub.run(), 5)
        assert (err.value.router_block_size, err.value.worker_block_size) == (16, BS)
        assert router.workers() == [] and sub.error is err.value
        assert w.events.num_subscribers == 0
    finally:
        await w.stop()


async def test_dropped_batches_cause_gap_and_resync():
    router = new_router()
    w = FakeWorker(max_queue_batches=2, stats_interval_s=60.0)
    target = await w.start()
    sub = KvEventSubscriber(router, target)
    sub.start()
    try:
        await asyncio.wait_for(sub.ready.wait(), 5)
        await asyncio.sleep(0.05)                   # the first stats message is read
        # The 3rd batch overflows the queue and no batch follows it: only the snapshot
        # sent in its place can bring the router up to date.
        for s in range(3):
            w.store(router, prompt(s), flush=True)
        await wait_for(lambda: all(router.find_matches(prompt(s)) == {"w0": 8}
                                   for s in range(3)))
        assert w.events.dropped_batches == 3 and sub.resyncs == 1
        for s in range(40):                         # no await: the queue overflows
            w.store(router, prompt(s), flush=True)
        await wait_for(lambda: all(router.find_matches(prompt(s)) == {"w0": 8}
                                   for s in range(40)))
        assert w.events.dropped_batches > 0 and sub.resyncs >= 1
        assert router.index.num_worker_blocks("w0") == len(w.cache)
    finally:
        await sub.stop()
        await w.stop()
    assert router.workers() == []                   # stop() removes the worker


async def test_two_routers_subscribe_to_one_worker():
    routers = [new_router(), new_router()]
    w = FakeWorker()
    target = await w.start()
    subs = [KvEventSubscriber(r, target) for r in routers]
    for s in subs:
        s.start()
    try:
        for s in subs:
            await asyncio.wait_for(s.ready.wait(), 5)
        w.store(routers[0], prompt(7))
        for r in routers:
            await wait_for(lambda r=r: r.find_matches(prompt(7)) == {"w0": 8})
    finally:
        for s in subs:
            await s.stop()
        await w.stop()


async def test_lost_batch_gap_resyncs_through_snapshot_rpc():
    router = new_router()
    w = FakeWorker()
    target = await w.start()
    fanout = w.events._fanout
    seen = {"n": 0}

    def lossy(data):                                # the network loses the 3rd batch
        seen["n"] += 1
        if seen["n"] != 3:
            fanout(data)

    w.events._fanout = lossy
    sub = KvEventSubscriber(router, target)
    sub.start()
    try:
        await asyncio.wait_for(sub.ready.wait(), 5)
        for s in range(6):
            w.store(router, prompt(s), flush=True)
            await asyncio.sleep(0.01)
        await wait_for(lambda: all(router.find_matches(prompt(s)) == {"w0": 8}
                                   for s in range(6)))
        assert sub.resyncs == 1 and w.events.dropped_batches == 0
        assert not router.index.is_stale("w0")
    finally:
        await sub.stop()
        await w.stop()
