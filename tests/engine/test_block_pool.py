import pytest

from splitserve.engine.block_pool import BlockPool, NoFreeBlocksError


class Sink:
    def __init__(self):
        self.events = []

    def on_stored(self, hashes, parent):
        self.events.append(("stored", list(hashes), parent))

    def on_removed(self, hashes):
        self.events.append(("removed", list(hashes)))

    def on_cleared(self):
        self.events.append(("cleared",))


def test_allocate_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.touch(a[:1])
    assert a[0].ref_cnt == 2
    pool.free(reversed(a))
    assert pool.num_free_blocks == 3  # a[0] still referenced once
    pool.free(a[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a[:1])


def test_cached_block_survives_free_and_is_evicted_lru():
    sink = Sink()
    pool = BlockPool(3, event_sink=sink)
    a, b = pool.allocate(2)
    pool.cache_blocks([a, b], [111, 222], None)
    assert sink.events == [("stored", [111, 222], None)]
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.get_cached_block(111) is a and pool.get_cached_block(222) is b
    # Hit on a: touching pulls it out of the free queue.
    pool.touch([a])
    assert pool.num_free_blocks == 2
    # Allocating 2 takes the never-cached block then b (LRU), evicting 222 only.
    got = pool.allocate(2)
    assert b in got
    assert pool.get_cached_block(222) is None and pool.get_cached_block(111) is a
    assert ("removed", [222]) in sink.events
    pool.free(got)
    pool.free([a])
    assert pool.num_free_blocks == 3


def test_no_caching_mode_and_reset():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_blocks([a], [5], None)
    assert pool.get_cached_block(5) is None
    pool.free([a])
    sink = Sink()
    pool = BlockPool(2, event_sink=sink)
    (a,) = pool.allocate(1)
    pool.cache_blocks([a], [5], None)
    assert not pool.reset_prefix_cache()  # a block is in use
    pool.free([a])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(5) is None and sink.events[-1] == ("cleared",)
