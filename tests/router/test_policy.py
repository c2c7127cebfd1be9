"""The cost model: prefill vs decode pool behaviour, temperature, modes, tie rotation."""

import random
from collections import Counter

import pytest

from splitserve.router.config import RouterConfig
from splitserve.router.policy import (
    Role,
    argmin_rotating,
    choose,
    kv_costs,
    load_costs,
    softmax_sample,
)

BS = 16


def cfg(**kw):
    return RouterConfig(block_size=BS, **kw)


def test_kv_cost_formula():
    c = cfg(overlap_weight=2.0, decode_overlap_weight=0.5)
    # 100 tokens, 6 full blocks; worker holds 2 blocks, 48 prefill tokens queued, 10 active.
    # New blocks: the 4 full blocks not cached there join its active blocks.
    assert kv_costs(Role.PREFILL, 100, 6, [2], [48], [10], c) == [2.0 * (100 - 32 + 48) / 16 + 10 + 4]
    assert kv_costs(Role.AGGREGATED, 100, 6, [2], [48], [10], c) == [2.0 * (100 - 32 + 48) / 16 + 10 + 4]
    assert kv_costs(Role.DECODE, 100, 6, [2], [48], [10], c) == [10 + 0.5 * (6 - 2)]
    assert load_costs([32], [10], c) == [12.0]


def test_prefill_pool_overlap_dominates():
    # 4k prompt: worker 0 holds 200 of 256 blocks but runs 40 active blocks; worker 1 idle.
    i, cost = choose(Role.PREFILL, [200, 0], [0, 0], [40, 0], 4096, 256, cfg(),
                     random.Random(0), 0)
    assert i == 0 and cost == pytest.approx(56 + 40 + 56)


def test_decode_pool_load_dominates_overlap_breaks_ties():
    c = cfg()
    i, _ = choose(Role.DECODE, [200, 0], [0, 0], [40, 0], 4096, 256, c, random.Random(0), 0)
    assert i == 1                                             # less loaded despite no overlap
    for turn in range(4):                                     # equal load: the holder, always
        i, _ = choose(Role.DECODE, [0, 200, 10], [0, 0, 0], [5, 5, 5], 4096, 256, c,
                      random.Random(0), turn)
        assert i == 1
    # A decode_overlap_weight trades pull volume against load.
    i, _ = choose(Role.DECODE, [200, 0], [0, 0], [40, 0], 4096, 256,
                  cfg(decode_overlap_weight=1.0), random.Random(0), 0)
    assert i == 0                                             # 40 + 56 < 0 + 256


def test_full_ties_rotate():
    picks = [choose(Role.AGGREGATED, [0, 0, 0], [0, 0, 0], [1, 1, 1], 64, 4, cfg(),
                    random.Random(0), t)[0] for t in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    assert argmin_rotating([3.0, 1.0, 1.0, 1.0], [0, 5, 5, 1], 1) == 2


def test_modes():
    rng = random.Random(0)
    args = ([0, 0, 0], [0, 0, 0], [9, 0, 5], 64, 4)
    rr = [choose(Role.AGGREGATED, *args, cfg(mode="round-robin"), rng, t)[0] for t in range(6)]
    assert rr == [0, 1, 2, 0, 1, 2]
    assert choose(Role.AGGREGATED, *args, cfg(mode="least-loaded"), rng, 0)[0] == 1
    # least-loaded ignores overlap, kv does not
    assert choose(Role.AGGREGATED, [4, 0], [0, 0], [1, 0], 64, 4, cfg(mode="least-loaded"),
                  rng, 0)[0] == 1
    assert choose(Role.AGGREGATED, [4, 0], [0, 0], [1, 0], 64, 4, cfg(), rng, 0)[0] == 0
    picks = Counter(choose(Role.AGGREGATED, *args, cfg(mode="random"), random.Random(s), 0)[0]
                    for s in range(300))
    assert set(picks) == {0, 1, 2}
    with pytest.raises(ValueError):
        choose(Role.AGGREGATED, [], [], [], 64, 4, cfg(), rng, 0)


def test_temperature_sampling_is_seeded_and_favours_cheap_workers():
    c = cfg(temperature=0.5)
    args = (Role.AGGREGATED, [0, 0, 0], [0, 0, 0], [0, 10, 20], 64, 4, c)
    seq1 = [choose(*args, r, 0)[0] for r in [random.Random(7)] for _ in range(200)]
    seq2 = [choose(*args, r, 0)[0] for r in [random.Random(7)] for _ in range(200)]
    seq3 = [choose(*args, r, 0)[0] for r in [random.Random(8)] for _ in range(200)]
    assert seq1 == seq2 and seq1 != seq3
    counts = Counter(seq1)
    assert counts[0] > counts[1] > counts[2] > 0
    # p ∝ exp(-norm/T): normalized costs 0, .5, 1 at T=.5 -> 1 : e^-1 : e^-2
    n = 20000
    r = random.Random(1)
    freq = Counter(softmax_sample([0, 10, 20], 0.5, r) for _ in range(n))
    assert freq[0] / n == pytest.approx(1 / (1 + 0.3679 + 0.1353), abs=0.02)
    # Higher temperature: flatter.
    flat = Counter(softmax_sample([0, 10, 20], 100.0, r) for _ in range(3000))
    assert min(flat.values()) > 800
    # Equal costs: uniform.
    eq = Counter(softmax_sample([5, 5], 0.1, r) for _ in range(2000))
    assert abs(eq[0] - eq[1]) < 300
    with pytest.raises(ValueError):
        softmax_sample([1, 2], 0.0, r)


def test_ties_go_to_the_worker_caching_less():
    # Equal cost and overlap: the emptier prefix cache wins, whatever the turn.
    for t in range(4):
        assert choose(Role.AGGREGATED, [0, 0, 0], [0, 0, 0], [0, 0, 0], 64, 4, cfg(),
                      random.Random(0), t, [30, 10, 20])[0] == 1
    assert argmin_rotating([1.0, 1.0, 1.0], [0, 0, 0], 1, [5, 5, 9]) == 1


def test_prefix_holder_keeps_its_prefix_while_running_requests_on_it():
    # 1,040-token prompt (65 blocks), 64 of them cached on worker 0, which already runs
    # requests on that prefix (66 active blocks); worker 1 is idle and caches nothing.
    # Worker 0: 1 block to compute + 66 active + 1 new; worker 1: 65 + 0 + 65.
    i, cost = choose(Role.AGGREGATED, [64, 0], [0, 0], [66, 0], 1040, 65, cfg(),
                     random.Random(0), 0)
    assert i == 0 and cost == pytest.approx(68)
