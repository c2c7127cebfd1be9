"""A decode worker's NIXL pulls from a prefill worker do not wait out the prefill worker's
running engine step.

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

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2 as pb
from splitserve.proto import worker_pb2_grpc
from splitserve.runtime.grpc_util import sampling_params_to_proto
from splitserve.runtime.worker_host import WorkerConfig, WorkerHost
from tests.engine.factories import tiny_engine
from tests.kv_transfer.peer import pull_in_child

pytestmark = [pytest.mark.live, pytest.mark.asyncio(loop_scope="module")]

BUSY_S = 6.0  # how long the prefill worker's engine thread stays busy
GAP_S = 0.5  # between the two pulls: the first notice has reached the worker by then


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def prefill_worker():
    eng = tiny_engine(num_kv_blocks=64)
    aeng = AsyncEngine(eng.config, engine=eng)
    await aeng.start()
    host = WorkerHost(WorkerConfig(role="prefill", worker_id="p0", kv_transport="nixl",
                                   engine=EngineConfig(model="tiny", dtype="float32")), engine=aeng)
    await host.start()
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
