"""KvIndex against a brute-force oracle, gap resync, removal, bounded memory, approx mode."""

import random
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.kv_hash import hash_token_blocks
from splitserve.router.errors import BlockSizeMismatch, EventGap, UnknownWorker
from splitserve.router.events import AllCleared, BlockRemoved, BlockStored, KvEventBatch
from splitserve.router.index import ApplyResult, KvIndex

BS = 4


def stored(hs, parent=None):
    return BlockStored(tuple(hs), parent, len(hs) * BS)


def batch(wid, eid, *evs, bs=BS):
    return KvEventBatch(wid, eid, bs, tuple(evs))


def oracle_matches(held: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out = {}
    for w, s in held.items():
        n = 0
        for h in hashes:
            if h not in s:
                break
            n += 1
        if n:
            out[w] = n
    return out


# A small universe of prompts so streams and queries share prefixes.
_rng = random.Random(0)
_BASES = [[_rng.randrange(50) for _ in range(8 * BS)] for _ in range(3)]
PROMPTS = [b[: k * BS] + [_rng.randrange(50) for _ in range(6 * BS)]
           for b in _BASES for k in (0, 2, 5)]
CHAINS = [hash_token_blocks(p, BS) for p in PROMPTS]

op = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 3), st.integers(0, len(CHAINS) - 1),
              st.integers(0, 13), st.integers(1, 14)),
    st.tuples(st.just("remove"), st.integers(0, 3), st.integers(0, len(CHAINS) - 1),
              st.integers(0, 13), st.integers(1, 14)),
    st.tuples(st.just("clear"), st.integers(0, 3)),
    st.tuples(st.just("leave"), st.integers(0, 3)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=60), st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1,
                                            max_size=6))
def test_index_matches_bruteforce_oracle(ops, queries):
    index = KvIndex(BS)
    held: dict[str, set[int]] = {}
    next_id: dict[str, int] = {}

    def ensure(w):
        if w not in held:
            index.add_worker(w, BS)
            held[w] = set()
            next_id[w] = 1

    for o in ops:
        w = f"w{o[1]}"
        if o[0] == "leave":
            if w in held:
                assert index.remove_worker(w) == len(held.pop(w))
            continue
        ensure(w)
        if o[0] == "store":
            hs = CHAINS[o[2]][o[3] : o[3] + o[4]]
            ev = stored(hs, CHAINS[o[2]][o[3] - 1] if o[3] and hs else None)
            held[w].update(hs)
        elif o[0] == "remove":
            hs = CHAINS[o[2]][o[3] : o[3] + o[4]]
            ev = BlockRemoved(tuple(hs))
            held[w].difference_update(hs)
        else:
            ev = AllCleared()
            held[w].clear()
        assert index.apply(batch(w, next_id[w], ev)) is ApplyResult.APPLIED
        next_id[w] += 1

        union = set().union(*held.values()) if held else set()
        assert index.num_blocks == len(union)
        for w2, s in held.items():
            assert index.num_worker_blocks(w2) == len(s)
    for q in queries:
        assert index.find_matches(PROMPTS[q]) == oracle_matches(held, CHAINS[q])
        for h in CHAINS[q]:
            assert index.workers_holding(h) == {w for w, s in held.items() if h in s}


def test_find_matches_counts_leading_blocks_only():
    index = KvIndex(BS)
    for w in ("a", "b", "c"):
        index.add_worker(w, BS)
    chain = CHAINS[0]
    index.apply(batch("a", 1, stored(chain[:6])))
    index.apply(batch("b", 1, stored(chain[:2] + chain[3:6])))   # hole at block 2
    index.apply(batch("c", 1, stored(chain[1:6])))               # no first block
    assert index.find_matches_for_hashes(chain) == {"a": 6, "b": 2}
    assert index.find_matches(PROMPTS[0]) == {"a": 6, "b": 2}
    assert index.find_matches_for_hashes([]) == {}
    assert index.find_matches(PROMPTS[0][: BS - 1]) == {}        # no full block


def test_duplicates_ignored_and_unknown_worker_ignored():
    index = KvIndex(BS)
    index.add_worker("a", BS)
    assert index.apply(batch("a", 1, stored([1, 2]))) is ApplyResult.APPLIED
    assert index.apply(batch("a", 1, BlockRemoved((1, 2)))) is ApplyResult.DUPLICATE
    assert index.num_worker_blocks("a") == 2
    assert index.apply(batch("ghost", 1, stored([9]))) is ApplyResult.IGNORED
    assert index.num_blocks == 2


def test_gap_raises_once_buffers_and_resyncs_from_snapshot():
    index = KvIndex(BS)
    index.add_worker("a", BS)
    index.apply(batch("a", 1, stored([1, 2, 3])))
    # Batches 2 and 3 are lost; 4 arrives: the worker removed 3 and stored 4 meanwhile.
    with pytest.raises(EventGap) as gap:
        index.apply(batch("a", 4, stored([5])))
    assert (gap.value.worker_id, gap.value.expected, gap.value.got) == ("a", 2, 4)
    assert index.is_stale("a") and index.stale_workers() == ["a"]
    assert index.apply(batch("a", 5, BlockRemoved((1,)))) is ApplyResult.BUFFERED
    # Snapshot as of event 3 (after the lost batches); 4 and 5 are replayed on top.
    assert index.load_snapshot("a", [1, 2, 4], 3) == 2
    assert not index.is_stale("a")
    assert index.last_event_id("a") == 5
    assert {h for h in range(10) if index.holds("a", h)} == {2, 4, 5}
    assert index.apply(batch("a", 6, stored([7]))) is ApplyResult.APPLIED
    assert index.holds("a", 7)


def test_snapshot_newer_than_buffer_drops_covered_batches():
    index = KvIndex(BS)
    index.add_worker("a", BS)
    with pytest.raises(EventGap):
        index.apply(batch("a", 3, stored([1])))
    index.apply(batch("a", 4, stored([2])))
    assert index.load_snapshot("a", [1, 2, 3], 4) == 0   # both buffered batches covered
    assert {h for h in range(5) if index.holds("a", h)} == {1, 2, 3}
    assert index.apply(batch("a", 4, stored([9]))) is ApplyResult.DUPLICATE


def test_gap_left_after_snapshot_raises_again():
    index = KvIndex(BS)
    index.add_worker("a", BS)
    with pytest.raises(EventGap):
        index.apply(batch("a", 5, stored([1])))
    with pytest.raises(EventGap) as gap:
        index.load_snapshot("a", [7], 2)                   # 3 and 4 still missing
    assert gap.value.expected == 3 and gap.value.got == 5
    assert index.is_stale("a") and index.holds("a", 7)
    assert index.load_snapshot("a", [7, 1], 5) == 0
    assert not index.is_stale("a")


def test_resync_buffer_is_bounded():
    index = KvIndex(BS, resync_buffer_batches=3)
    index.add_worker("a", BS)
    with pytest.raises(EventGap):
        index.apply(batch("a", 2, stored([1])))
    for eid in range(3, 20):
        assert index.apply(batch("a", eid, stored([eid]))) is ApplyResult.BUFFERED
    # Only the 3 newest are kept: a snapshot as of 16 replays 17..19.
    assert index.load_snapshot("a", [], 16) == 3
    assert {h for h in range(25) if index.holds("a", h)} == {17, 18, 19}


def test_remove_worker_drops_everything_and_slot_reuse_is_clean():
    index = KvIndex(BS)
    index.add_worker("a", BS)
    index.add_worker("b", BS)
    index.apply(batch("a", 1, stored(CHAINS[0])))
    index.apply(batch("b", 1, stored(CHAINS[0][:3])))
    assert index.remove_worker("a") == len(CHAINS[0])
    assert index.remove_worker("a") == 0
    assert "a" not in index and index.workers() == ["b"]
    assert index.num_blocks == 3
    assert index.find_matches_for_hashes(CHAINS[0]) == {"b": 3}
    index.add_worker("c", BS)                               # reuses a's slot
    assert index.find_matches_for_hashes(CHAINS[0]) == {"b": 3}
    index.remove_worker("b")
    index.remove_worker("c")
    assert index.num_blocks == 0
    with pytest.raises(UnknownWorker):
        index.num_worker_blocks("a")


def test_block_size_mismatch_is_an_error():
    index = KvIndex(16)
    with pytest.raises(BlockSizeMismatch) as err:
        index.add_worker("a", 32)
    assert err.value.worker_block_size == 32 and err.value.router_block_size == 16
    assert "a" not in index
    index.add_worker("a", 16)
    with pytest.raises(BlockSizeMismatch):
        index.apply(KvEventBatch("a", 1, 8, (stored([1]),)))
    with pytest.raises(BlockSizeMismatch):
        index.load_snapshot("a", [1], 0, block_size=8)
    assert index.num_blocks == 0
    with pytest.raises(ValueError):
        index.add_worker("a", 16)                           # already subscribed


def test_memory_stays_bounded_under_long_random_stream():
    """Workers with LRU pools of `cap` blocks churn through many prompts: the index never
    holds more than the union of the pools, and forgets everything when they leave."""
    rng = random.Random(1)
    cap, n_workers = 64, 6
    index = KvIndex(BS)
    pools: dict[str, OrderedDict] = {}
    eids: dict[str, int] = {}
    for i in range(n_workers):
        pools[f"w{i}"] = OrderedDict()
        eids[f"w{i}"] = 0
        index.add_worker(f"w{i}", BS)
    prefixes = [[rng.randrange(1000) for _ in range(BS * rng.randrange(1, 12))] for _ in range(40)]
    total_events = 0
    for step in range(4000):
        w = f"w{rng.randrange(n_workers)}"
        pool = pools[w]
        prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(BS * rng.randrange(0, 8))]
        hs = hash_token_blocks(prompt, BS)
        new = [h for h in hs if h not in pool]
        for h in hs:
            pool[h] = None
            pool.move_to_end(h)
        evicted = []
        while len(pool) > cap:
            evicted.append(pool.popitem(last=False)[0])
        evs = []
        if new:
            evs.append(stored(new))
        if evicted:
            evs.append(BlockRemoved(tuple(evicted)))
        if rng.random() < 0.002:
            pool.clear()
            evs.append(AllCleared())
        eids[w] += 1
        index.apply(batch(w, eids[w], *evs))
        total_events += len(new)
        if step % 250 == 0:
            union = set().union(*(set(p) for p in pools.values()))
            assert index.num_blocks == len(union) <= cap * n_workers
            for wid, p in pools.items():
                assert index.num_worker_blocks(wid) == len(p)
    assert total_events > 10 * cap * n_workers                # the stream really churned
    for wid in pools:
        index.remove_worker(wid)
    assert index.num_blocks == 0


def test_approximate_workers_expire_and_are_capped():
    now = [100.0]
    index = KvIndex(BS, approx_ttl_s=10.0, approx_max_blocks=5, clock=lambda: now[0])
    index.add_worker("a", BS, approximate=True)
    index.add_worker("b", BS)
    assert index.is_approximate("a") and not index.is_approximate("b")
    chain = CHAINS[1]
    assert index.record_routed("a", chain[:3])
    assert not index.record_routed("b", chain[:3])            # publishes events: no-op
    assert index.find_matches_for_hashes(chain) == {"a": 3}
    assert index.apply(batch("a", 1, stored([1]))) is ApplyResult.IGNORED
    now[0] = 105.0
    index.record_routed("a", chain[:1])                       # refreshes block 0 only
    now[0] = 111.0
    assert index.expire() == 2                                # blocks 1, 2 expired
    assert index.find_matches_for_hashes(chain) == {"a": 1}
    index.record_routed("a", chain[:8])                       # capped at 5, oldest dropped
    assert index.num_worker_blocks("a") == 5
    assert index.find_matches_for_hashes(chain) == {}          # head was evicted first
    assert index.find_matches_for_hashes(chain[3:]) == {"a": 5}
    now[0] = 200.0
    assert index.expire() == 5 and index.num_blocks == 0
    with pytest.raises(ValueError):
        index.load_snapshot("a", [1], 0)


def test_approximate_capacity_follows_pool_size():
    index = KvIndex(BS, approx_max_blocks=100)
    index.add_worker("a", BS, approximate=True, capacity=4)
    index.record_routed("a", CHAINS[0])
    assert index.num_worker_blocks("a") == 4
    assert index.remove_worker("a") == 4 and index.num_blocks == 0


def test_lazy_token_matching_equals_hash_matching_across_chunk_boundaries():
    rng = random.Random(5)
    tokens = [rng.randrange(1000) for _ in range(300 * BS + 3)]
    chain = hash_token_blocks(tokens, BS)
    index = KvIndex(BS)
    lengths = [1, 3, 4, 5, 12, 13, 27, 28, 29, 60, 61, 124, 125, 188, 189, 250, 300]
    for i, n in enumerate(lengths):
        index.add_worker(f"w{i}", BS)
        index.apply(batch(f"w{i}", 1, stored(chain[:n])))
    expected = {f"w{i}": n for i, n in enumerate(lengths)}
    assert index.find_matches_for_hashes(chain) == expected
    assert index.find_matches(tokens) == expected
    for cut in (0, 1, 4, 5, 29, 130, 299):
        want = {w: min(n, cut) for w, n in expected.items() if min(n, cut)}
        assert index.find_matches(tokens[: cut * BS + 2]) == want
