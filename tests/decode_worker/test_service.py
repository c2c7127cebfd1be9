"""The decode worker's gRPC service on a tiny random-weight engine: Generate, errors with the
offending param, Abort, cancellation freeing blocks, Stats, Health, the KV-handle fallback."""

import asyncio

import grpc
import pytest
import pytest_asyncio

from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2 as pb
from splitserve.proto import worker_pb2_grpc
from splitserve.runtime.grpc_util import param_from_error, sampling_params_to_proto
from tests.helpers.worker import start_tiny_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker():
    host = await start_tiny_worker("decode", "d0")
    channel = grpc.aio.insecure_channel(host.address)
    yield host, worker_pb2_grpc.WorkerStub(channel)
    await channel.close()
    await host.stop(grace=0)


def request(rid, prompt=(5, 6, 7, 8), **params):
    sp = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **params})
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=list(prompt),
                              sampling_params=sampling_params_to_proto(sp))


async def collect(stub, req):
    return [r async for r in stub.Generate(req)]


async def blocks_free(host, timeout=3.0):
    for _ in range(int(timeout / 0.02)):
        s = host.engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_generate_streams_until_finished(worker):
    host, stub = worker
    msgs = await collect(stub, request("g1", logprobs=2))
    tokens = [t for m in msgs for t in m.token_ids]
    assert len(tokens) == 8
    assert msgs[-1].finished and msgs[-1].finish_reason == "length"
    assert not any(m.finished for m in msgs[:-1])
    assert msgs[0].num_prompt_tokens == 4
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    assert all(len(lp.top) == 2 for m in msgs for lp in m.logprobs)
    # greedy through gRPC == greedy on the engine directly
    direct = [t async for out in host.engine.generate("direct", [5, 6, 7, 8],
                                                      SamplingParams(max_tokens=8, temperature=0,
                                                                     ignore_eos=True))
              for t in out.new_token_ids]
    assert tokens == direct
    assert await blocks_free(host)


@pytest.mark.parametrize("req,param", [
    (request("e1", prompt=()), "prompt"),
    (request("e2", prompt=(9999,)), "prompt"),
    (pb.GenerateRequest(request_id="e3", prompt_token_ids=[1],
                        sampling_params=pb.SamplingParams(max_tokens=4, top_p=2.0)), "top_p"),
    (pb.GenerateRequest(request_id="e4", prompt_token_ids=[1],
                        sampling_params=pb.SamplingParams(max_tokens=0, top_p=1.0)), "max_tokens"),
    (request("e5", max_tokens=10_000), None),
    (request(""), "request_id"),
])
async def test_bad_requests_are_invalid_argument_naming_param(worker, req, param):
    _, stub = worker
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await collect(stub, req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if param is not None:
        assert param_from_error(ei.value) == param
    assert ei.value.details()


async def test_cancel_mid_stream_frees_blocks(worker):
    host, stub = worker
    call = stub.Generate(request("c1", max_tokens=200))
    n = 0
    async for _ in call:
        n += 1
        if n == 3:
            break
    call.cancel()
    assert await blocks_free(host)


async def test_abort_rpc_ends_the_stream_and_frees_blocks(worker):
    host, stub = worker
    call = stub.Generate(request("a1", max_tokens=200))
    first = await call.read()
    assert first.token_ids
    await stub.Abort(pb.AbortRequest(request_id="a1"))
    rest = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        rest.append(msg)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert sum(len(m.token_ids) for m in rest) < 199
    assert await blocks_free(host)
    await stub.Abort(pb.AbortRequest(request_id="unknown"))  # a no-op


async def test_stats_and_health(worker):
    host, stub = worker
    s = await stub.Stats(pb.StatsRequest())
    assert s.worker_id == "d0" and s.role == "decode" and s.block_size == 4
    assert s.num_total_blocks == 64 and s.max_model_len == 512
    h = await stub.Health(pb.HealthRequest())
    assert h.status == pb.HealthResponse.SERVING and h.role == "decode"


async def test_concurrent_requests_all_finish(worker):
    host, stub = worker
    results = await asyncio.gather(*(collect(stub, request(f"p{i}", prompt=(i + 3, 4, 5)))
                                     for i in range(6)))
    assert all(sum(len(m.token_ids) for m in r) == 8 for r in results)
    assert await blocks_free(host)


async def test_kv_handle_without_transport_prefills_locally(worker):
    host, stub = worker
    full = [t for m in await collect(stub, request("k0", max_tokens=6)) for t in m.token_ids]
    req = request("k1", max_tokens=6)
    req.kv_handle.CopyFrom(pb.KvHandle(worker_id="prefill-0", agent_name="agent",
                                       block_ids=[1, 2], num_tokens=4, first_token=full[0]))
    rest = [t for m in await collect(stub, req) for t in m.token_ids]
    assert [full[0]] + rest == full
    assert await blocks_free(host)
