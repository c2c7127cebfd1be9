"""A real worker (WorkerHost around a tiny engine) publishes its block pool's KV events on
its gRPC port: a router subscribed to it sees the prompt's blocks after a Generate, loads
the snapshot of what was cached before it subscribed, gets the worker's load, and the
stream ends when the worker stops."""

import asyncio

import grpc
import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2 as pb
from splitserve.proto import worker_pb2_grpc
from splitserve.router import Router, RouterConfig
from splitserve.router.service import KvEventSubscriber
from splitserve.runtime.grpc_util import sampling_params_to_proto
from tests.helpers.worker import start_tiny_worker

BS = 4  # tiny_engine's block size


async def wait_for(cond, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def start_host(worker_id="d0", **cfg):
    return await start_tiny_worker("decode", worker_id, **cfg)


async def generate(address, rid, prompt):
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        req = pb.GenerateRequest(request_id=rid, prompt_token_ids=list(prompt),
                                 sampling_params=sampling_params_to_proto(sp))
        return [m async for m in stub.Generate(req)]


async def test_worker_publishes_kv_events_to_a_router():
    host = await start_host(kv_events_flush_s=0.005)
    router = Router(RouterConfig(block_size=BS))
    sub = None
    try:
        assert host.kv_events is not None and host.kv_events.block_size == BS
        before = list(range(10, 26))               # 16 tokens: 4 full blocks
        await generate(host.address, "r0", before)  # cached before anyone subscribes
        sub = KvEventSubscriber(router, host.address, "decode", expected_worker_id="d0")
        sub.start()
        await asyncio.wait_for(sub.ready.wait(), 10)
        assert router.find_matches(before) == {"d0": 4}     # from the snapshot
        after = list(range(100, 124))               # 24 tokens: 6 full blocks
        await generate(host.address, "r1", after)
        await wait_for(lambda: router.find_matches(after).get("d0") == 6)
        # Load arrives on the same stream (stats every 0.5 s).
        await wait_for(lambda: router.load.view("d0").total_blocks == 64, timeout=3)
    finally:
        await host.stop(grace=0)
    # The worker ended the stream: the router dropped it.
    await wait_for(lambda: router.workers() == [], timeout=5)
    if sub is not None:
        await sub.stop()


async def test_kv_events_can_be_turned_off():
    host = await start_host(worker_id="d1", kv_events=False)
    try:
        assert host.kv_events is None
        async with grpc.aio.insecure_channel(host.address) as ch:
            call = ch.unary_stream("/splitserve.router.KvEvents/Subscribe")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call.read()
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await host.stop(grace=0)
