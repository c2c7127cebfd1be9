"""WorkerPool: membership, health, least-loaded choice, 503 when none."""

import pytest

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.worker_pool import WorkerPool
from splitserve.proto import worker_pb2


def pool_with(n=3, role="decode"):
    pool = WorkerPool()
    for i in range(n):
        w = pool.add(f"w{i}", role, f"127.0.0.1:{1000 + i}")
        w.healthy = True
        w.stats = worker_pb2.StatsResponse(num_free_blocks=10, num_total_blocks=10,
                                           max_model_len=100 + i)
    return pool


def test_counts_per_role_include_zero_roles():
    pool = pool_with(2)
    pool.get("w1").healthy = False
    assert pool.counts() == {"decode": 1, "prefill": 0}


def test_pick_least_in_flight():
    pool = pool_with(3)
    pool.get("w0").in_flight = 2
    pool.get("w1").in_flight = 0
    pool.get("w2").in_flight = 1
    assert pool.pick().worker_id == "w1"


def test_ties_spread_over_workers():
    pool = pool_with(3)
    picked = {pool.pick().worker_id for _ in range(6)}
    assert picked == {"w0", "w1", "w2"}


def test_unhealthy_and_excluded_are_skipped():
    pool = pool_with(2)
    pool.mark_failed("w0")
    assert pool.pick().worker_id == "w1"
    with pytest.raises(NoWorkerAvailable) as ei:
        pool.pick(exclude=["w1"], retry_after_s=3)
    assert ei.value.status == 503 and ei.value.headers["Retry-After"] == "3"


def test_no_prefill_worker_is_503():
    with pytest.raises(NoWorkerAvailable):
        pool_with(2).pick("prefill")


def test_custom_selector_plugs_in():
    pool = pool_with(3)
    pool.selector = lambda cands, prompt: max(cands, key=lambda w: w.worker_id)
    assert pool.pick(prompt_token_ids=[1, 2]).worker_id == "w2"


def test_max_model_len_is_smallest_healthy():
    pool = pool_with(3)
    assert pool.max_model_len() == 100
    pool.mark_failed("w0")
    assert pool.max_model_len() == 101


async def test_remove_and_duplicate_add():
    pool = pool_with(2)
    with pytest.raises(ValueError):
        pool.add("w0", "decode", "127.0.0.1:1")
    with pytest.raises(ValueError):
        pool.add("x", "encode", "127.0.0.1:1")
    await pool.remove("w0")
    assert [w.worker_id for w in pool.workers()] == ["w1"]


async def test_refresh_marks_unreachable_worker_unhealthy():
    from tests.frontend.fakes import free_port

    pool = WorkerPool()
    w = pool.add("gone", "decode", f"127.0.0.1:{free_port()}")
    w.healthy = True
    await pool.refresh()
    assert not w.healthy and pool.counts()["decode"] == 0
    await pool.close()
