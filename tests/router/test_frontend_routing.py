"""The frontend's KV routing (frontend/routing.py) against workers publishing KV events on
loopback: the pool's picks follow prefix overlap, requests are booked and released,
workers without events are routed approximately, leaving workers leave the router, busy
workers are a 503 with Retry-After, the figures reach Prometheus, the flags reach the
config (and `splitserve serve` passes them on)."""

import argparse

import grpc
import pytest

from splitserve.frontend.errors import NoWorkerAvailable
from splitserve.frontend.metrics import FrontendMetrics
from splitserve.frontend.routing import KvRouting
from splitserve.frontend.worker_pool import WorkerPool
from splitserve.proto import worker_pb2
from splitserve.router import RouterConfig
from tests.router.test_service import BS, FakeWorker, prompt, wait_for


def add(pool, wid, address, role="decode"):
    c = pool.add(wid, role, address)
    c.healthy = True
    c.stats = worker_pb2.StatsResponse(num_free_blocks=100, num_total_blocks=100)
    return c


async def two_workers(**router_kw):
    """Two event-publishing fake workers ("w0", "w1") in a pool under other ids."""
    ws = [FakeWorker("w0"), FakeWorker("w1")]
    pool = WorkerPool()
    addrs = [await w.start() for w in ws]
    add(pool, "decode-a", addrs[0])
    routing = KvRouting(RouterConfig(block_size=BS, **router_kw), pool)
    await routing.start()
    add(pool, "decode-b", addrs[1])                 # joins after start: on_add follows it
    await wait_for(lambda: sorted(routing.router.workers()) == ["w0", "w1"])
    return ws, pool, routing


async def stop_all(ws, routing):
    await routing.stop()
    for w in ws:
        await w.stop()


async def test_pick_follows_prefix_and_books_the_request():
    ws, pool, routing = await two_workers()
    try:
        assert pool.selector is routing
        ws[1].store(routing.router, prompt(0), flush=True)
        await wait_for(lambda: routing.router.find_matches(prompt(0)) == {"w1": 8})
        for i in range(3):                      # every time, not by rotation
            w = pool.pick("decode", prompt(0) + [1, 2, 3], request_id=f"r{i}")
            assert w.worker_id == "decode-b"
            pool.request_first_token(f"r{i}")
            pool.request_finished(f"r{i}")
        assert routing.router.load.num_requests() == 0
        pool.pick("decode", prompt(0), request_id="open")
        assert routing.router.load.num_requests() == 1
        pool.request_finished("open")
        assert routing.router.load.num_requests() == 0
        # Disaggregation asks how much of a prompt the best decode worker lacks.
        assert pool.uncached_tokens(prompt(0) + [7] * 10) == 10
        assert pool.uncached_tokens(prompt(1)) == len(prompt(1))
        m = routing.metrics()
        assert m["routed"] == {"decode-b": 4} and m["prefix_hit_rate"] > 0.9
    finally:
        await stop_all(ws, routing)
    assert routing.router.workers() == []


async def test_round_robin_ignores_the_prefix():
    ws, pool, routing = await two_workers(mode="round-robin")
    try:
        ws[1].store(routing.router, prompt(0), flush=True)
        await wait_for(lambda: routing.router.find_matches(prompt(0)) == {"w1": 8})
        picked = {pool.pick("decode", prompt(0)).worker_id for _ in range(4)}
        assert picked == {"decode-a", "decode-b"}
    finally:
        await stop_all(ws, routing)


async def test_removed_worker_leaves_the_router():
    ws, pool, routing = await two_workers()
    try:
        await pool.remove("decode-a")
        await wait_for(lambda: routing.router.workers() == ["w1"])
        assert {pool.pick("decode", prompt(2)).worker_id for _ in range(3)} == {"decode-b"}
    finally:
        await stop_all(ws, routing)


async def test_all_busy_is_503_with_retry_after():
    # The fake workers report 1 waiting request: with max_queue=1 both are busy.
    ws, pool, routing = await two_workers(max_queue=1, retry_after_s=2.5)
    try:
        await wait_for(lambda: all(routing.router.load.view(w).num_waiting == 1
                                   for w in ("w0", "w1")))
        with pytest.raises(NoWorkerAvailable) as exc:
            pool.pick("decode", prompt(0), request_id="busy")
        assert exc.value.status == 503 and exc.value.headers["Retry-After"] == "3"
        assert routing.router.load.num_requests() == 0
    finally:
        await stop_all(ws, routing)


async def test_worker_without_kv_events_is_routed_approximately():
    servers, pool = [], WorkerPool()
    for i in range(2):
        s = grpc.aio.server()                   # no KvEvents methods: UNIMPLEMENTED
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        servers.append(s)
        add(pool, f"plain-{i}", f"127.0.0.1:{port}")
    routing = KvRouting(RouterConfig(block_size=BS), pool)
    await routing.start()
    try:
        await wait_for(lambda: sorted(routing.router.workers()) == ["plain-0", "plain-1"])
        assert all(routing.router.index.is_approximate(w) for w in ("plain-0", "plain-1"))
        first = pool.pick("decode", prompt(5), request_id="a1").worker_id
        pool.request_finished("a1")
        # The router remembers where it sent the prompt: the follow-up goes there too.
        for i in range(3):
            assert pool.pick("decode", prompt(5) + [9], request_id=f"a{i + 2}").worker_id == first
            pool.request_finished(f"a{i + 2}")
        await pool.remove(first)
        assert first not in routing.router.workers()
    finally:
        await routing.stop()
        for s in servers:
            await s.stop(0)


async def test_unknown_candidates_fall_back_to_least_loaded():
    pool = WorkerPool()
    add(pool, "x", "127.0.0.1:1")                # nothing listens: never known
    routing = KvRouting(RouterConfig(block_size=BS), pool)
    await routing.start()
    try:
        assert pool.pick("decode", prompt(0), request_id="r").worker_id == "x"
        assert routing.fallback_picks == 1
        pool.request_finished("r")               # harmless for an unbooked request
    finally:
        await routing.stop()


async def test_router_metrics_reach_prometheus():
    ws, pool, routing = await two_workers()
    try:
        ws[0].store(routing.router, prompt(3), flush=True)
        await wait_for(lambda: routing.router.find_matches(prompt(3)) == {"w0": 8})
        pool.pick("decode", prompt(3), request_id="m1")
        metrics = FrontendMetrics()
        metrics.attach_router(routing.metrics)
        text = metrics.render().decode()
        assert 'splitserve_router_info{mode="kv"} 1.0' in text
        assert "splitserve_router_prefix_hit_rate 1.0" in text
        assert 'splitserve_router_routed_requests_total{worker="decode-a"} 1.0' in text
        assert 'splitserve_router_workers{role="decode",state="events",worker="decode-b"} 1.0' in text
        assert "splitserve_router_tracked_requests 1.0" in text
    finally:
        await stop_all(ws, routing)


def frontend_args(*argv):
    from splitserve.frontend.cli import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["frontend", *argv])


def test_cli_flags_map_onto_the_router_config():
    from splitserve.frontend.cli import config_from_args

    cfg = config_from_args(frontend_args())
    assert cfg.router.mode == "kv" and cfg.router.block_size == 16
    cfg = config_from_args(frontend_args(
        "--router-mode", "round-robin", "--router-temperature", "0.5",
        "--router-max-active-blocks-frac", "0.8", "--router-max-queue", "4",
        "--router-block-size", "32"))
    r = cfg.router
    assert (r.mode, r.temperature, r.max_active_blocks_frac, r.max_queue, r.block_size) == (
        "round-robin", 0.5, 0.8, 4, 32)
    with pytest.raises(ValueError):
        config_from_args(frontend_args("--router-max-active-blocks-frac", "0"))


def test_serve_passes_router_flags_and_engine_block_size():
    from splitserve.runtime.serve_cli import build_plan, register

    p = argparse.ArgumentParser()
    p.add_argument("--log-level", default="info")
    register(p.add_subparsers())
    args = p.parse_args(["serve", "--block-size", "32", "--router-mode", "random",
                         "--router-max-queue", "3"])
    _, frontend = build_plan(args, "embedded://x")
    ns = frontend_args(*frontend[frontend.index("frontend") + 1:])
    assert (ns.router_mode, ns.router_block_size, ns.router_max_queue) == ("random", 32, 3)


async def test_app_routes_repeated_prefixes_to_the_worker_holding_them():
    """The whole frontend in process (tiny engines, block size 4): follow-ups of a prefix
    land where it is cached, usage reports the hit, and every request is released."""
    import httpx

    from tests.frontend.fakes import inprocess_stack

    async with inprocess_stack(2, router=RouterConfig(block_size=BS)) as stack:
        routing = stack.app.state.routing
        await wait_for(lambda: len(routing.router.workers()) == 2, timeout=10)
        prefixes = {"A": list(range(10, 50)), "B": list(range(50, 90))}    # 10 blocks each
        home: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=30) as h:
            for turn in range(3):
                for name, prefix in prefixes.items():
                    before = dict(routing.routed)
                    r = await h.post(stack.url + "/v1/completions", json={
                        "model": "tiny", "prompt": prefix + [100 + turn, 121, 122],
                        "max_tokens": 2, "temperature": 0})
                    assert r.status_code == 200, r.text
                    (served,) = [w for w, n in routing.routed.items() if n != before.get(w, 0)]
                    home.setdefault(name, served)
                    assert served == home[name]
                    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    assert (cached >= len(prefix)) == (turn > 0), (name, turn, cached)
                    # The worker's cached blocks reach the router before the next request.
                    await wait_for(lambda p=prefix, w=served: routing.router.find_matches(p)
                                   .get(w) == len(p) // BS)
            text = (await h.get(stack.url + "/metrics")).text
        assert routing.router.load.num_requests() == 0
        assert routing.metrics()["prefix_hit_rate"] > 0.5
        assert "splitserve_router_prefix_hit_rate" in text
