"""Nothing a prefill worker answers waits out its running engine step: neither a decode
worker's NIXL pulls nor the Prefill answer (the first token and the KV handle).

Under UCX's peer error handling a READ posted after an earlier notice completes only when
the target next drives its UCX progress, which the prefill worker does from its notification
loop. That loop used to await each release on the engine thread, i.e. behind the running
step: with a multi-second prefill step, the second pull of a burst waited for the step to
end. Here a real prefill worker (tiny engine, NIXL) holds two prefills pinned while its
engine thread is busy for seconds; a puller in another process pulls both, each with its
notice, half a second apart (as the prefills of a burst finish), and both pulls must finish
while the engine is still busy.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import grpc
import pytest
import pytest_asyncio

from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2 as pb
from splitserve.proto import worker_pb2_grpc
from splitserve.runtime.grpc_util import sampling_params_to_proto
from tests.helpers.worker import start_tiny_worker
from tests.kv_transfer.peer import pull_in_child

pytestmark = [pytest.mark.live, pytest.mark.asyncio(loop_scope="module")]

BUSY_S = 6.0  # how long the prefill worker's engine thread stays busy
GAP_S = 0.5  # between the two pulls: the first notice has reached the worker by then


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def prefill_worker():
    host = await start_tiny_worker("prefill", "p0", kv_transport="nixl")
    channel = grpc.aio.insecure_channel(host.address)
    yield host, worker_pb2_grpc.WorkerStub(channel)
    await channel.close()
    await host.stop(grace=0)


async def test_pulls_finish_while_the_prefill_engine_is_busy(prefill_worker):
    host, stub = prefill_worker
    assert host.transport is not None and host.transport.kind == "nixl"
    params = sampling_params_to_proto(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    handles = []
    for i in range(2):
        rid = f"burst-{i}"
        resp = await stub.Prefill(pb.GenerateRequest(request_id=rid, prompt_token_ids=list(range(5 + i, 30 + i)),
                                                     sampling_params=params), timeout=30)
        assert resp.HasField("kv_handle") and resp.kv_handle.block_ids
        handles.append((rid, list(resp.kv_handle.block_ids)))
    assert host.servicer.extra_stats()["num_pinned"] == 2

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    shape = tuple(host.engine.engine.runner.kv_cache.shape)
    proc = ctx.Process(target=pull_in_child, args=(host.transport.local_metadata(), shape, handles, GAP_S, child), daemon=True)
    proc.start()
    try:
        msg = await asyncio.to_thread(lambda: parent.recv() if parent.poll(90) else ("timeout",))
        assert msg[0] == "ready", msg
        # the engine thread is now busy for BUSY_S, as in a long prefill step
        busy = asyncio.create_task(host.engine.call(lambda e: time.sleep(BUSY_S)))
        await asyncio.sleep(0.2)
        busy_until = time.time() + BUSY_S - 0.2
        parent.send("go")
        msg = await asyncio.to_thread(lambda: parent.recv() if parent.poll(60) else ("timeout",))
        assert msg[0] == "done", msg
        ends = msg[1]
        assert max(ends) < busy_until, (
            f"a pull ended {max(ends) - busy_until + BUSY_S:.2f} s into a {BUSY_S} s engine step: "
            "it waited for the prefill worker's step")
        assert not busy.done(), "the engine was idle before the pulls ended; the test proves nothing"
        await busy
        for _ in range(100):  # the notices release both prefills once the engine is free
            if host.servicer.extra_stats()["num_pinned"] == 0:
                break
            await asyncio.sleep(0.05)
        assert host.servicer.extra_stats()["num_pinned"] == 0
        st = host.engine.stats()
        assert st.num_free_blocks == st.num_total_blocks
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


async def test_prefill_answer_does_not_wait_for_the_next_step(prefill_worker, monkeypatch):
    """The handle goes back as soon as the prompt's own step ends, although the engine is
    already running the next prompt's (here made to take BUSY_S)."""
    host, stub = prefill_worker
    eng = host.engine.engine
    real_step = eng.step
    state = {"quick_done": False, "slept": False}

    def step():
        if state["quick_done"] and not state["slept"]:
            state["slept"] = True
            time.sleep(BUSY_S)  # the next prompt's long step
        outs = real_step()
        state["quick_done"] |= any(o.request_id == "quick" and o.finished for o in outs)
        return outs

    monkeypatch.setattr(eng, "step", step)
    params = sampling_params_to_proto(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    async def prefill(rid, n):
        t0 = time.monotonic()
        resp = await stub.Prefill(pb.GenerateRequest(request_id=rid, prompt_token_ids=[3 + i % 50 for i in range(n)],
                                                     sampling_params=params), timeout=60)
        return resp, time.monotonic() - t0

    # Hold the engine thread while both arrive, so one step starts them together (quick
    # first): the tiny engine's budget is 64 tokens, quick ends in that step, long needs more.
    gate = asyncio.create_task(host.engine.call(lambda e: time.sleep(0.5)))
    await asyncio.sleep(0.05)
    quick_call = asyncio.create_task(prefill("quick", 20))
    await asyncio.sleep(0.2)
    long_call = asyncio.create_task(prefill("long", 120))
    await gate
    (quick, t_quick), (long, t_long) = await quick_call, await long_call
    assert state["slept"], "the engine never ran a step after the quick prompt's; the test proves nothing"
    assert quick.kv_handle.block_ids and long.kv_handle.block_ids
    assert t_quick < BUSY_S / 2 < t_long, (t_quick, t_long)
    for rid in ("quick", "long"):
        assert (await stub.ReleaseKv(pb.ReleaseKvRequest(request_id=rid), timeout=10)).released
    for _ in range(100):
        st = host.engine.stats()
        if host.servicer.extra_stats()["num_pinned"] == 0 and st.num_free_blocks == st.num_total_blocks:
            break
        await asyncio.sleep(0.05)
    assert host.servicer.extra_stats()["num_pinned"] == 0
    st = host.engine.stats()
    assert st.num_free_blocks == st.num_total_blocks
