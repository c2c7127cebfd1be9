"""Co-location mode of the simulator: prefill and decode replicas sharing a host's cores."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.planner.profile import Profile
from splitserve.planner.simulator.cluster import ColocatedPrefillPool
from splitserve.planner.simulator.run import PlannerPolicy, SimConfig, StaticPolicy, colocation_slowdowns, simulate
from splitserve.planner.simulator.traces import Trace

from .factories import analytic_profile_dict


def colocated_profile(prefill_slowdown: float = 2.0, decode_slowdown: float = 1.5) -> Profile:
    d = analytic_profile_dict()
    d["metadata"]["colocation"] = {"prefill_slowdown": prefill_slowdown, "decode_slowdown": decode_slowdown}
    return Profile.from_dict(d)


def cfg(**kw) -> SimConfig:
    return SimConfig(ttft_ms=1e6, itl_ms=1e6, interval_s=10, decode_dt_s=0.001, colocated=True, **kw)


def test_slowdowns_come_from_the_profile():
    assert colocation_slowdowns(colocated_profile(1.7, 1.2)) == (1.7, 1.2)
    with pytest.raises(ValueError, match="profile --colocation"):
        colocation_slowdowns(Profile.from_dict(analytic_profile_dict()))
    with pytest.raises(ValueError, match=">= 1"):
        colocation_slowdowns(colocated_profile(0.5, 1.0))


def test_a_lone_request_runs_at_profile_speed():
    prof = colocated_profile()
    tr = Trace("one", np.array([1.0]), np.array([2000]), np.array([101]), 30.0)
    res = simulate(tr, prof, StaticPolicy("s", 1, 1), cfg())
    # nothing decodes while it prefills, nothing prefills while it decodes
    assert res.ttft_ms["mean"] == pytest.approx(float(prof.prefill_ttft_ms(2000)), rel=1e-3)
    assert res.itl_ms["mean"] == pytest.approx(float(prof.decode_itl_ms(1, 2050)), rel=0.01)


def test_each_pool_slows_the_other():
    prof = colocated_profile(prefill_slowdown=2.0, decode_slowdown=1.5)
    # request 0 decodes for ~1 s (100 tokens x ~10 ms); request 1 prefills (120 ms) meanwhile
    tr = Trace("two", np.array([0.0, 0.5]), np.array([2000, 2000]), np.array([101, 2]), 30.0)
    res = simulate(tr, prof, StaticPolicy("s", 1, 1), cfg())
    ttft = res.request_ttft_s * 1e3
    assert ttft[0] == pytest.approx(120, rel=1e-3)
    assert ttft[1] == pytest.approx(240, rel=0.02)  # at half speed next to the decoding request
    itl0 = float(prof.decode_itl_ms(1, 2050))
    # for 240 ms request 0 decoded at 1/1.5 speed: it lost 240 x (1 - 1/1.5) ms over 100 tokens
    assert res.request_itl_s[0] * 1e3 == pytest.approx(itl0 + 240 * (1 - 1 / 1.5) / 100, rel=0.01)
    alone = simulate(tr, prof, StaticPolicy("s", 1, 1), SimConfig(ttft_ms=1e6, itl_ms=1e6, interval_s=10,
                                                                  decode_dt_s=0.001))
    assert alone.request_ttft_s[1] * 1e3 == pytest.approx(120, rel=1e-3)


def test_prefill_steps_batch_queued_prompts_up_to_the_token_budget():
    first = np.full(4, np.nan)
    pool = ColocatedPrefillPool(1, max_batched_tokens=2048)
    arrival = np.array([0.0, 0.0, 0.0, 0.0])
    isl = np.array([1000, 800, 600, 100])
    occ = isl / 1000.0  # 1 ms a token
    pool.route(np.arange(4), arrival, isl, occ)
    for s in range(4000):
        pool.step(s * 0.001, 0.001, np.zeros(1, dtype=bool), 1.0, first)
    # step 1: 1000 + 800 + 248 of 600 tokens (2.048 s): the first two finish together;
    # step 2: the other 352 + 100 (0.452 s)
    assert first[0] == pytest.approx(2.048) and first[1] == pytest.approx(2.048)
    assert first[2] == pytest.approx(2.5) and first[3] == pytest.approx(2.5)
    assert pool.idle()

    one = ColocatedPrefillPool(1)  # no budget: one whole prompt per step (FIFO)
    first[:] = np.nan
    one.route(np.arange(4), arrival, isl, occ)
    for s in range(4000):
        one.step(s * 0.001, 0.001, np.zeros(1, dtype=bool), 1.0, first)
    assert first.tolist() == pytest.approx([1.0, 1.8, 2.4, 2.5])


def test_colocated_mode_takes_fixed_pools_only():
    prof = colocated_profile()
    from splitserve.planner.config import PlannerConfig

    rng = np.random.default_rng(0)
    arr = np.sort(rng.uniform(0, 120, 600))
    tr = Trace("load", arr, np.full(arr.size, 2000), np.full(arr.size, 20), 120.0)
    policy = PlannerPolicy(PlannerConfig(ttft_ms=200, itl_ms=50, interval_s=10), prof)
    with pytest.raises(ValueError, match="fixed pools"):
        simulate(tr, prof, policy, cfg())
