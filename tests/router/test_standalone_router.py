"""The standalone router (router/grpc_service.py) and its frontend client (router/remote.py)
on loopback: two frontends' pools route through one router and share its index and load
view, marks release bookings in order, busy is a 503 with the router's Retry-After, an
unreachable router is a 503 `router_unavailable`, workers a frontend knows are pushed to the
router, the Stats/Health/ListWorkers RPCs, and the CLI flags."""

import asyncio

import grpc
import pytest

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.metrics import FrontendMetrics
from splitserve.frontend.worker_pool import WorkerPool
from splitserve.proto import router_pb2, router_pb2_grpc
from splitserve.router import RouterConfig
from splitserve.router.grpc_service import RouterService
from splitserve.router.remote import RemoteRouting, RouterUnavailable
from tests.router.test_frontend_routing import add
from tests.router.test_service import BS, FakeWorker, prompt, wait_for


async def stack(n_frontends=2, static=True, worker_kw=None, **router_kw):
    """Two event-publishing fake workers (FakeWorker's `worker_kw`), a RouterService
    following them (static workers, or none: the frontends push theirs), and `n_frontends`
    pools routing through it."""
    ws = [FakeWorker("w0", **(worker_kw or {})), FakeWorker("w1", **(worker_kw or {}))]
    addrs = [await w.start() for w in ws]
    service = RouterService(RouterConfig(block_size=BS, **router_kw),
                            [("decode", a) for a in addrs] if static else (),
                            stats_interval_s=0.2)
    port = await service.start("127.0.0.1", 0)
    frontends = []
    for i in range(n_frontends):
        pool = WorkerPool()
        for j, a in enumerate(addrs):
            add(pool, f"decode-{j}", a)
        remote = RemoteRouting(f"127.0.0.1:{port}", pool, stats_interval_s=0.05,
                               client_id=f"fe{i}")
        await remote.start()
        frontends.append((pool, remote))
    await wait_for(lambda: sorted(service.routing.router.workers()) == ["w0", "w1"])
    return ws, service, port, frontends


async def teardown(ws, service, frontends):
    for _, remote in frontends:
        await remote.stop()
    await service.stop()
    for w in ws:
        await w.stop()


def router_view(service):
    return service.routing.router


async def test_two_frontends_share_the_index_and_the_load_view():
    ws, service, _, fes = await stack()
    router = router_view(service)
    try:
        ws[1].store(router, prompt(0), flush=True)
        await wait_for(lambda: router.find_matches(prompt(0)) == {"w1": 8})
        for i, (pool, _) in enumerate(fes):
            w = await pool.pick_async("decode", prompt(0) + [1, 2], request_id=f"r{i}")
            assert w.worker_id == "decode-1"            # the prefix holder, from either frontend
        # Both bookings are in the one load view (the same request id from two frontends
        # does not collide: each client prefixes its ids).
        await pool.pick_async("decode", prompt(0), request_id="r0")
        assert router.load.num_requests() == 3
        assert service.clients == {"fe0": 1, "fe1": 2}
        for i, (pool, _) in enumerate(fes):
            pool.request_first_token(f"r{i}")
            pool.request_finished(f"r{i}")
        fes[1][0].request_finished("r0")
        await wait_for(lambda: router.load.num_requests() == 0)
        # Disaggregation asks the router how much of a prompt the best decode worker lacks.
        pool = fes[0][0]
        assert await pool.uncached_tokens_async(prompt(0) + [7] * 10) == 10
        assert await pool.uncached_tokens_async(prompt(1)) == len(prompt(1))
        # The frontend's /metrics: router-wide figures, this frontend's own picks.
        remote = fes[0][1]
        await wait_for(lambda: remote.router_stats is not None
                       and remote.router_stats.requests == 3)
        metrics = FrontendMetrics()
        metrics.attach_router(remote.metrics)
        text = metrics.render().decode()
        assert 'splitserve_router_info{mode="kv"} 1.0' in text
        assert "splitserve_router_requests_total 3.0" in text
        assert 'splitserve_router_routed_requests_total{worker="decode-1"} 1.0' in text
        assert 'splitserve_router_workers{role="decode",state="events",worker=' in text
    finally:
        await teardown(ws, service, fes)
    assert router.workers() == []


async def test_marks_reach_the_router_before_a_rebooking():
    ws, service, _, fes = await stack(n_frontends=1)
    router = router_view(service)
    pool, remote = fes[0]
    try:
        for _ in range(20):   # the retry path: finished, then picked again at once
            await pool.pick_async("decode", prompt(2), request_id="same")
            pool.request_first_token("same")
            pool.request_finished("same")
            await pool.pick_async("decode", prompt(2), request_id="same")
            assert router.load.num_requests() == 1
            pool.request_finished("same")
        await wait_for(lambda: router.load.num_requests() == 0)
        # Booked requests still open when the frontend stops are released by it.
        await pool.pick_async("decode", prompt(3), request_id="open")
        assert router.load.num_requests() == 1
        await remote.stop()
        assert router.load.num_requests() == 0
    finally:
        await teardown(ws, service, fes)


async def test_all_busy_is_503_with_the_routers_retry_after():
    # The fake workers report 1 waiting request: with max_queue=1 both are busy.
    ws, service, _, fes = await stack(n_frontends=1, max_queue=1, retry_after_s=2.5)
    router = router_view(service)
    try:
        await wait_for(lambda: all(router.load.view(w).num_waiting == 1 for w in ("w0", "w1")))
        with pytest.raises(NoWorkerAvailable) as exc:
            await fes[0][0].pick_async("decode", prompt(0), request_id="busy")
        assert exc.value.status == 503 and exc.value.headers["Retry-After"] == "3"
        assert router.load.num_requests() == 0
    finally:
        await teardown(ws, service, fes)


async def test_unreachable_router_is_503_router_unavailable():
    pool = WorkerPool()
    add(pool, "decode-0", "127.0.0.1:1")
    probe = grpc.aio.server()
    port = probe.add_insecure_port("127.0.0.1:0")   # a free port nobody serves
    await probe.stop(0)
    remote = RemoteRouting(f"127.0.0.1:{port}", pool, timeout_s=2)
    await remote.start()
    try:
        with pytest.raises(RouterUnavailable) as exc:
            await pool.pick_async("decode", prompt(0), request_id="x")
        err = exc.value
        assert err.status == 503 and err.code == "router_unavailable"
        assert err.headers["Retry-After"] == "1"
        assert err.body()["error"]["type"] == "service_unavailable_error"
        with pytest.raises(RouterUnavailable):
            await pool.uncached_tokens_async(prompt(0))
        pool.request_finished("x")                    # nothing booked: nothing sent
    finally:
        await remote.stop()


async def test_frontend_pushes_its_workers_to_a_router_that_has_none():
    # Idle fake workers: until a worker's first Stats arrive the router counts its load as
    # 0, so workers reporting 30 used blocks made the prefix choice depend on whose Stats
    # had arrived by the pick (decode-1 chosen in ~1 of 20 runs).
    ws, service, port, fes = await stack(n_frontends=2, static=False,
                                         worker_kw={"num_waiting": 0, "free_blocks": 100})
    try:
        # Both frontends pushed both workers; the router kept one entry per address.
        assert sorted(w.worker_id for w in service.pool.workers()) == ["decode-0", "decode-1"]
        ws[0].store(router_view(service), prompt(4), flush=True)
        await wait_for(lambda: router_view(service).find_matches(prompt(4)) == {"w0": 8})
        w = await fes[1][0].pick_async("decode", prompt(4), request_id="p")
        assert w.worker_id == "decode-0"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            listed = await stub.ListWorkers(router_pb2.ListWorkersRequest())
            assert {(w.worker_id, w.state) for w in listed.workers} == {
                ("decode-0", "events"), ("decode-1", "events")}
            health = await stub.Health(router_pb2.RouterHealthRequest())
            assert (health.status, health.num_workers) == ("ok", 2)
            stats = await stub.Stats(router_pb2.RouterStatsRequest())
            assert (stats.mode, stats.block_size, stats.requests) == ("kv", BS, 1)
            assert dict(stats.clients) == {"fe1": 1} and dict(stats.routed) == {"decode-0": 1}
            assert stats.tracked_requests == 1
            # AddWorker is idempotent by address; RemoveWorker drops the worker.
            again = await stub.AddWorker(router_pb2.AddWorkerRequest(worker=router_pb2.WorkerInfo(
                worker_id="other", role="decode", address=f"127.0.0.1:{ws[0].port}")))
            assert (again.added, again.worker_id) == (False, "decode-0")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.AddWorker(router_pb2.AddWorkerRequest(
                    worker=router_pb2.WorkerInfo(role="nope", address="x:1")))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            gone = await stub.RemoveWorker(router_pb2.RemoveWorkerRequest(worker_id="decode-1"))
            assert gone.removed
            await wait_for(lambda: router_view(service).workers() == ["w0"])
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Route(router_pb2.RouteRequest(pool="elsewhere"))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await teardown(ws, service, fes)


async def test_candidates_the_router_does_not_follow_are_picked_locally():
    ws, service, _, fes = await stack(n_frontends=1)
    pool, remote = fes[0]
    try:
        stranger = add(pool, "decode-x", "127.0.0.1:1")   # the router cannot reach it
        w = await pool.pick_async("decode", prompt(0), exclude=["decode-0", "decode-1"],
                                  request_id="s")
        assert w is stranger and remote.fallback_picks >= 1
        assert router_view(service).load.num_requests() == 0
        # A synchronous pick cannot ask the router: the pool's least-loaded choice.
        busy = {w.worker_id: w for w in pool.workers("decode")}
        for wid, w in busy.items():
            w.in_flight = 0 if wid == "decode-1" else 5
        picks = remote.fallback_picks
        assert pool.pick("decode", prompt(0)) is busy["decode-1"]
        assert remote.fallback_picks == picks + 1
        assert router_view(service).load.num_requests() == 0
        for w in busy.values():
            w.in_flight = 0
    finally:
        await teardown(ws, service, fes)


@pytest.mark.parametrize("mark_in_flight", [False, True])
async def test_prefill_and_decode_bookings_of_one_request(monkeypatch, mark_in_flight):
    """The disaggregated flow: a prefill pick, its first token, then the decode pick. With
    `mark_in_flight` the first-token mark is already on its way (the router answers it
    slowly) when the decode pick is made: the pick must still reach the router after it."""
    if mark_in_flight:
        original = RouterService.MarkPrefillDone

        async def slow_mark(self, request, context):
            await asyncio.sleep(0.3)
            return await original(self, request, context)

        monkeypatch.setattr(RouterService, "MarkPrefillDone", slow_mark)
    # Workers reporting no waiting requests: their Stats would otherwise be a floor under
    # the tracked count once they arrive, whatever the marks did.
    ws = [FakeWorker("p0", num_waiting=0), FakeWorker("d0", num_waiting=0)]
    addrs = [await w.start() for w in ws]
    service = RouterService(RouterConfig(block_size=BS),
                            [("prefill", addrs[0]), ("decode", addrs[1])])
    port = await service.start()
    pool = WorkerPool()
    add(pool, "prefill-0", addrs[0], role="prefill")
    add(pool, "decode-0", addrs[1])
    remote = RemoteRouting(f"127.0.0.1:{port}", pool)
    await remote.start()
    router = router_view(service)
    try:
        await wait_for(lambda: sorted(router.workers()) == ["d0", "p0"])
        assert (await pool.pick_async("prefill", prompt(6), request_id="d")).worker_id == "prefill-0"
        pool.request_first_token("d")                   # the prefill worker's part is over
        if mark_in_flight:
            await asyncio.sleep(0.1)  # the send loop has taken the mark and is sending it
        w = await pool.pick_async("decode", prompt(6), request_id="d", remote_kv=True)
        assert w.worker_id == "decode-0"
        assert router.load.view("p0").num_waiting == 0  # the mark arrived before the booking
        assert router.load.num_requests() == 1
        pool.request_finished("d")
        await wait_for(lambda: router.load.num_requests() == 0)
    finally:
        await remote.stop()
        await service.stop()
        for w in ws:
            await w.stop()


def parse(command, *argv):
    from splitserve.runtime.cli import build_parser

    return build_parser().parse_args([command, *argv])


def test_router_cli_shares_the_frontends_router_flags():
    from splitserve.frontend.routing import router_config_from_args

    args = parse("router", "--port", "7001", "--worker", "decode=127.0.0.1:5000",
                 "--discovery", "embedded://x", "--router-mode", "least-loaded",
                 "--router-temperature", "0.3", "--router-max-active-blocks-frac", "0.7",
                 "--router-max-queue", "2", "--router-block-size", "32")
    cfg = router_config_from_args(args)
    assert (cfg.mode, cfg.temperature, cfg.max_active_blocks_frac, cfg.max_queue,
            cfg.block_size) == ("least-loaded", 0.3, 0.7, 2, 32)
    assert (args.port, args.worker, args.discovery) == (7001, ["decode=127.0.0.1:5000"],
                                                        "embedded://x")
    assert args.func(parse("router", "--router-max-active-blocks-frac", "0")) == 2
    assert args.func(parse("router", "--worker", "nonsense")) == 2


def test_frontend_router_address_flag():
    from splitserve.frontend.cli import config_from_args

    assert config_from_args(parse("frontend")).router_address is None
    cfg = config_from_args(parse("frontend", "--router-address", "10.0.0.5:7000"))
    assert cfg.router_address == "10.0.0.5:7000"
    with pytest.raises(ValueError):
        config_from_args(parse("frontend", "--router-address", "nohost"))


async def test_router_service_refuses_a_taken_port():
    a = RouterService(RouterConfig())
    port = await a.start()
    b = RouterService(RouterConfig())
    try:
        with pytest.raises(OSError):
            await b.start("127.0.0.1", port)
    finally:
        await a.stop()
        await asyncio.sleep(0)
