"""The load view: lifecycle of routed requests, reconciliation with Stats, no leaks."""

import pytest

from splitserve.engine.outputs import EngineStats
from splitserve.router.load import LoadTracker, LoadView, is_busy


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def stats(waiting=0, running=0, free=100, total=100):
    return EngineStats(num_waiting=waiting, num_running=running, num_free_blocks=free,
                       num_total_blocks=total, block_size=16)


def make(**kw):
    clock = Clock()
    lt = LoadTracker(clock=clock, **kw)
    lt.add_worker("a", total_blocks=100)
    lt.add_worker("b")
    return lt, clock


def test_request_lifecycle_drains_to_zero():
    lt, _ = make()
    lt.on_routed("r1", "a", prefill_tokens=300, blocks=20)
    lt.on_routed("r2", "a", prefill_tokens=50, blocks=4)
    assert lt.view("a") == LoadView(350, 24, 2, 100)
    lt.on_first_token("r1")
    assert lt.view("a") == LoadView(50, 24, 1, 100)
    lt.on_first_token("r1")                                   # idempotent
    assert lt.view("a") == LoadView(50, 24, 1, 100)
    lt.on_finished("r1")
    lt.on_finished("r2")                                      # finished before first token
    assert lt.view("a") == LoadView(0, 0, 0, 100)
    assert lt.num_requests() == 0
    lt.on_finished("r1")                                      # unknown: no-op
    assert lt.view("b").total_blocks is None


def test_disaggregated_request_prefill_entry_ends_at_first_token():
    lt, _ = make()
    lt.on_routed("r", "b", prefill_tokens=400, blocks=25, prefill_only=True)
    lt.on_routed("r", "a", prefill_tokens=0, blocks=25)
    assert lt.view("b").prefill_tokens == 400 and lt.view("b").active_blocks == 25
    lt.on_first_token("r")
    assert lt.view("b") == LoadView(0, 0, 0, None)
    assert lt.view("a") == LoadView(0, 25, 0, 100)
    lt.on_finished("r")
    assert lt.view("a").active_blocks == 0 and lt.num_requests() == 0


def test_same_request_twice_on_one_worker_is_refused():
    lt, _ = make()
    lt.on_routed("r", "a", prefill_tokens=1, blocks=1)
    with pytest.raises(ValueError):
        lt.on_routed("r", "a", prefill_tokens=1, blocks=1)


def test_fresh_stats_floor_the_tracked_load_stale_ones_do_not():
    lt, clock = make(stats_ttl_s=5.0)
    lt.on_routed("r", "a", prefill_tokens=10, blocks=4)
    lt.update_stats("a", stats(waiting=3, running=2, free=40, total=100))
    assert lt.view("a") == LoadView(10, 60, 3, 100)           # work the router did not route
    clock.t += 6.0
    assert lt.view("a") == LoadView(10, 4, 1, 100)            # stats too old: tracked only
    lt.update_stats("b", stats(free=10, total=50))            # learns b's pool size
    assert lt.view("b").total_blocks == 50 and lt.view("b").active_blocks == 40


def test_idle_stats_drop_old_entries_only():
    lt, clock = make(stats_ttl_s=5.0)
    lt.on_routed("old", "a", prefill_tokens=10, blocks=4)
    clock.t += 10.0
    lt.on_routed("new", "a", prefill_tokens=5, blocks=2)
    lt.update_stats("a", stats(waiting=0, running=0))
    # "old" was lost (its completion never came); "new" may not have reached the worker yet.
    assert lt.view("a") == LoadView(5, 2, 1, 100)
    assert lt.num_requests() == 1


def test_busy_stats_keep_entries():
    lt, clock = make(stats_ttl_s=5.0)
    lt.on_routed("old", "a", prefill_tokens=10, blocks=4)
    clock.t += 10.0
    lt.update_stats("a", stats(waiting=0, running=1, free=96))
    assert lt.num_requests() == 1


def test_timed_out_requests_are_dropped():
    lt, clock = make(request_timeout_s=30.0)
    lt.on_routed("r", "a", prefill_tokens=10, blocks=4)
    clock.t += 31.0
    lt.on_routed("r2", "b", prefill_tokens=1, blocks=1)      # any update runs the sweep
    assert lt.view("a") == LoadView(0, 0, 0, 100)
    assert lt.num_requests() == 1


def test_remove_worker_drops_its_requests():
    lt, _ = make()
    lt.on_routed("r", "a", prefill_tokens=10, blocks=4)
    lt.on_routed("r", "b", prefill_tokens=0, blocks=4)
    lt.remove_worker("a")
    assert "a" not in lt and lt.num_requests() == 1
    lt.on_finished("r")
    assert lt.num_requests() == 0
    lt.remove_worker("a")                                     # twice: no-op
    lt.on_routed("x", "a", prefill_tokens=1, blocks=1)        # gone worker: ignored
    assert lt.num_requests() == 0


def test_busy_rules_and_eligible():
    assert is_busy(96, 0, 100, 0.95, None)
    assert not is_busy(95, 0, 100, 0.95, None)
    assert not is_busy(10_000, 0, None, 0.95, None)          # pool size unknown
    assert is_busy(0, 4, 100, 1.0, 4) and not is_busy(0, 3, 100, 1.0, 4)
    lt, _ = make()
    lt.on_routed("r", "a", prefill_tokens=7, blocks=96)
    assert lt.view("a").is_busy(0.95, None)
    assert lt.eligible(["a", "b"], 0.95, None) == (["b"], [0], [0])
    assert lt.eligible(["a", "b"], 1.0, None) == (["a", "b"], [7, 0], [96, 0])
    assert lt.eligible(["a", "b"], 1.0, 1) == (["b"], [0], [0])
    assert lt.eligible(["a", "b"], 1.0, None, exclude={"b"}) == (["a"], [7], [96])


def test_requests_sharing_a_prefix_count_its_blocks_once():
    lt, _ = make()
    prefix = [11, 12, 13, 14]
    lt.on_routed("r1", "a", prefill_tokens=80, blocks=5, block_hashes=prefix + [21])
    lt.on_routed("r2", "a", prefill_tokens=8, blocks=6, block_hashes=prefix + [31])
    # 4 shared + 1 + 1 distinct full blocks, and r2's partial tail block.
    assert lt.view("a").active_blocks == 4 + 1 + 1 + 1
    lt.on_routed("r3", "b", prefill_tokens=80, blocks=5, block_hashes=prefix + [21])
    assert lt.view("b").active_blocks == 5                    # per worker
    lt.on_finished("r1")
    assert lt.view("a").active_blocks == 4 + 1 + 1            # r2 still holds the prefix
    lt.on_finished("r2")
    lt.on_finished("r3")
    assert lt.view("a").active_blocks == lt.view("b").active_blocks == 0
    assert lt.num_requests() == 0
