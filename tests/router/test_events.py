"""KV event types, their msgpack wire format, and the worker-side publisher."""

import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.errors import EventDecodeError
from splitserve.router.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvEventPublisher,
    KvHello,
    KvSnapshot,
    WorkerStats,
    decode_batch,
    decode_message,
    decode_snapshot,
    encode_batch,
    encode_hello,
    encode_snapshot,
    encode_stats,
)
from splitserve.router.index import KvIndex

u64 = st.integers(min_value=0, max_value=2**64 - 1)
hashes = st.lists(u64, min_size=1, max_size=20).map(tuple)
events = st.one_of(
    st.builds(lambda h, p: BlockStored(h, p, len(h) * 16), hashes, st.none() | u64),
    st.builds(BlockRemoved, hashes),
    st.just(AllCleared()),
)
worker_ids = st.text(min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(worker_ids, st.integers(1, 2**40), st.sampled_from([1, 4, 16, 64]),
       st.lists(events, max_size=12).map(tuple))
def test_batch_round_trip(wid, event_id, bs, evs):
    batch = KvEventBatch(wid, event_id, bs, evs)
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    assert decode_message(data) == batch


@settings(max_examples=100, deadline=None)
@given(worker_ids, st.integers(0, 2**40), st.lists(u64, max_size=50).map(tuple))
def test_snapshot_round_trip(wid, event_id, hs):
    snap = KvSnapshot(wid, event_id, 16, hs)
    assert decode_snapshot(encode_snapshot(snap)) == snap


def test_wire_format_is_compact_plain_msgpack():
    batch = KvEventBatch(
        "w0", 7, 16,
        (BlockStored((1, 2**64 - 1), None, 32), BlockRemoved((5,)), AllCleared()),
    )
    raw = msgpack.unpackb(encode_batch(batch))
    assert raw == [1, 0, "w0", 7, 16, [[0, [1, 2**64 - 1], None, 32], [1, [5]], [2]]]
    # Eight-byte hashes stay ~9 bytes on the wire: no pickle, no per-field names.
    big = KvEventBatch("w0", 1, 16, (BlockStored(tuple(range(2**63, 2**63 + 1000)), None, 16000),))
    assert len(encode_batch(big)) < 1000 * 9 + 64


def test_hello_and_stats_round_trip():
    for hello in (KvHello("w", 16, 1000), KvHello("w", 16)):
        assert decode_message(encode_hello(hello)) == hello
    st_ = WorkerStats("w", 1, 2, 30, 400)
    assert decode_message(encode_stats(st_, 16)) == st_
    with pytest.raises(EventDecodeError):
        decode_batch(encode_hello(KvHello("w", 16)))


@pytest.mark.parametrize("data", [
    msgpack.packb([1, 3, "w", 0, 16, [1, 2]]),                   # stats: too few fields
    msgpack.packb([1, 2, "w", 0, 16, []]),                       # hello: no total
    b"",
    b"\x93\x01\x02\x03",                                          # wrong shape
    msgpack.packb([2, 0, "w", 1, 16, []]),                       # unknown version
    msgpack.packb([1, 9, "w", 1, 16, []]),                       # unknown kind
    msgpack.packb([1, 0, "w", 1, 16, [[7, [1]]]]),                # unknown event tag
    msgpack.packb([1, 0, "w", 1, 16, [[0, [1]]]]),                # stored missing fields
    msgpack.packb([1, 0, "w", "1", 16, []]),                     # event id not an int
])
def test_decode_rejects_malformed(data):
    with pytest.raises(EventDecodeError):
        decode_message(data)


def test_decode_batch_vs_snapshot_kind_checked():
    snap = encode_snapshot(KvSnapshot("w", 0, 16, (1,)))
    batch = encode_batch(KvEventBatch("w", 1, 16, ()))
    with pytest.raises(EventDecodeError):
        decode_batch(snap)
    with pytest.raises(EventDecodeError):
        decode_snapshot(batch)


# -- publisher -----------------------------------------------------------------------------
def collect():
    out: list = []
    return out, lambda data: out.append(decode_message(data))


def test_publisher_numbers_and_batches():
    out, sink = collect()
    pub = KvEventPublisher("w", 4, sink, max_batch_events=3)
    assert pub.flush() is None and out == []          # nothing pending: no empty batch
    pub.on_stored([1, 2], None)
    pub.on_removed([1])
    assert out == []                                  # below the batch limits
    assert pub.flush() == 1
    pub.on_stored([3], 2)
    pub.on_stored([4], 3)
    pub.on_stored([5], 4)                             # third event: flushed on its own
    assert [b.event_id for b in out] == [1, 2]
    assert out[0].events == (BlockStored((1, 2), None, 8), BlockRemoved((1,)))
    assert out[1].events == tuple(BlockStored((h,), h - 1, 4) for h in (3, 4, 5))
    assert all(b.worker_id == "w" and b.block_size == 4 for b in out)
    pub.on_stored([], None)                           # empty changes publish nothing
    pub.on_removed([])
    assert pub.flush() is None and pub.last_event_id == 2


def test_publisher_flushes_on_block_count():
    out, sink = collect()
    pub = KvEventPublisher("w", 4, sink, max_batch_blocks=10)
    pub.on_stored(list(range(6)), None)
    assert out == []
    pub.on_removed(list(range(4)))
    assert len(out) == 1 and out[0].event_id == 1


def test_cleared_drops_pending_events():
    out, sink = collect()
    pub = KvEventPublisher("w", 4, sink)
    pub.on_stored([1, 2], None)
    pub.on_cleared()
    pub.on_stored([9], None)
    pub.flush()
    assert out[0].events == (AllCleared(), BlockStored((9,), None, 4))


def test_snapshot_flushes_first_and_carries_last_event_id():
    out, sink = collect()
    held = {10, 11}
    pub = KvEventPublisher("w", 4, sink, snapshot_source=lambda: sorted(held))
    assert decode_snapshot(pub.snapshot()) == KvSnapshot("w", 0, 4, (10, 11))
    pub.on_stored([12], 11)
    held.add(12)
    snap = decode_snapshot(pub.snapshot())
    assert [b.event_id for b in out] == [1]           # the pending event went out first
    assert snap.event_id == 1 and snap.block_hashes == (10, 11, 12)


def test_snapshot_without_source_raises():
    pub = KvEventPublisher("w", 4, lambda d: None)
    with pytest.raises(RuntimeError):
        pub.snapshot()
    pub.set_snapshot_source(lambda: [3])
    assert decode_snapshot(pub.snapshot()).block_hashes == (3,)


def test_publisher_validates_arguments():
    with pytest.raises(ValueError):
        KvEventPublisher("w", 0, lambda d: None)
    with pytest.raises(ValueError):
        KvEventPublisher("w", 4, lambda d: None, max_batch_events=0)


def test_publisher_thread_safe_ids_contiguous_and_state_converges():
    """The engine thread publishes while the service thread flushes and snapshots."""
    received: list[bytes] = []
    lock = threading.Lock()

    def sink(data):
        with lock:
            received.append(data)

    pool_state: set[int] = set()
    pub = KvEventPublisher("w", 4, sink, snapshot_source=lambda: list(pool_state),
                           max_batch_events=7)
    stop = threading.Event()

    def engine():
        for i in range(3000):
            h = i + 1
            pool_state.add(h)
            pub.on_stored([h], None)
            if i % 3 == 0:
                pool_state.discard(h - 1)
                pub.on_removed([h - 1])
        stop.set()

    t = threading.Thread(target=engine)
    t.start()
    snapshots = []
    while not stop.is_set():
        pub.flush()
        snapshots.append(pub.snapshot())
    t.join()
    pub.flush()
    batches = [decode_batch(d) for d in received]
    assert [b.event_id for b in batches] == list(range(1, len(batches) + 1))
    # Any snapshot taken mid-stream + the batches after it converge on the final pool.
    for snap_data in (snapshots[len(snapshots) // 2], snapshots[-1]):
        index = KvIndex(4)
        index.add_worker("w", 4)
        snap = decode_snapshot(snap_data)
        index.load_snapshot("w", snap.block_hashes, snap.event_id)
        for b in batches:
            index.apply(b)
        held = {h for h in pool_state if index.holds("w", h)}
        assert held == pool_state
        assert index.num_worker_blocks("w") == len(pool_state)


def test_block_pool_event_sink_feeds_index_exactly():
    """The engine's real BlockPool + KVCacheManager with a publisher as event_sink: after
    every request the router's index holds exactly the pool's cached hashes, and the
    router's match count equals the engine's own prefix-cache hits."""
    import random

    rng = random.Random(3)
    bs = 4
    index = KvIndex(bs)
    index.add_worker("w", bs)
    pub = KvEventPublisher("w", bs, lambda d: index.apply(decode_batch(d)))
    pool = BlockPool(24, event_sink=pub)
    pub.set_snapshot_source(pool.cached_hashes)
    kv = KVCacheManager(pool, bs)
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(4, 20))] for _ in range(5)]
    for i in range(150):
        prompt = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
        req = Request(f"r{i}", prompt, SamplingParams())
        hits = kv.find_cached_prefix(req)
        pub.flush()
        router_match = index.find_matches(prompt).get("w", 0)
        # The engine leaves >= 1 token to compute; the router counts every full block held.
        assert len(hits) == min(router_match, (len(prompt) - 1) // bs)
        assert kv.allocate(req, len(prompt) - len(hits) * bs, hits)
        req.num_computed_tokens = len(prompt)
        kv.cache_full_blocks(req)
        kv.free(req)
        pub.flush()
        assert {h for h in pool.cached_hashes() if index.holds("w", h)} == set(pool.cached_hashes())
        assert index.num_worker_blocks("w") == pool.num_cached_blocks
    assert pool.reset_prefix_cache()
    pub.flush()
    assert index.num_blocks == 0
