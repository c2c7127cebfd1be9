from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.kv_hash import ROOT_HASH, hash_block_tokens, hash_token_blocks
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams


def make(prompt, bs=4, blocks=8):
    pool = BlockPool(blocks)
    return pool, KVCacheManager(pool, bs), Request("r", prompt, SamplingParams())


def test_hash_chain_definition():
    toks = list(range(10))
    hs = hash_token_blocks(toks, 4)
    assert len(hs) == 2
    assert hs[0] == hash_block_tokens(ROOT_HASH, toks[:4])
    assert hs[1] == hash_block_tokens(hs[0], toks[4:8])
    # Same block content under another parent hashes differently.
    assert hash_block_tokens(123, toks[:4]) != hs[0]


def test_prefix_hit_miss_and_free():
    pool, kv, r1 = make(list(range(10)))
    assert kv.find_cached_prefix(r1) == []  # miss
    assert kv.allocate(r1, 10)
    assert len(r1.blocks) == 3
    r1.num_computed_tokens = 10
    kv.cache_full_blocks(r1)
    assert pool.num_cached_blocks == 2
    kv.free(r1)
    assert pool.num_free_blocks == 8

    r2 = Request("r2", list(range(9)) + [99, 98], SamplingParams())
    hits = kv.find_cached_prefix(r2)
    assert [b.block_id for b in hits] == [b.block_id for b in pool.blocks[:2]] or len(hits) == 2
    assert kv.allocate(r2, 11 - 8, hits)
    assert r2.blocks[:2] == hits and len(r2.blocks) == 3
    kv.free(r2)
    assert pool.num_free_blocks == 8


def test_full_prompt_hit_leaves_one_token_to_compute():
    pool, kv, r1 = make(list(range(8)))
    kv.allocate(r1, 8)
    r1.num_computed_tokens = 8
    kv.cache_full_blocks(r1)
    kv.free(r1)
    r2 = Request("r2", list(range(8)), SamplingParams())
    assert len(kv.find_cached_prefix(r2)) == 1  # (8 - 1) // 4


def test_allocate_refuses_when_short_and_changes_nothing():
    pool, kv, r = make(list(range(20)), blocks=4)
    assert not kv.allocate(r, 20)
    assert r.blocks == [] and pool.num_free_blocks == 4
