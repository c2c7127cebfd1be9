"""Keepalive between our gRPC clients and servers: a stream that stays quiet (a prompt queued
behind others, a KV-event subscription with nothing to report) must outlive the clients'
pings. gRPC's server default answers pings more frequent than every 5 min on a quiet
connection with strikes and, after 2, GOAWAY too_many_pings, failing the call."""

from __future__ import annotations

import asyncio

from splitserve.router.service import CHANNEL_OPTIONS
from splitserve.runtime.grpc_util import GRPC_OPTIONS, KEEPALIVE_TIME_MS

SERVER_ONLY = ("grpc.http2.min_recv_ping_interval_without_data_ms", "grpc.http2.max_ping_strikes")


def test_servers_accept_the_pings_every_client_sends():
    server = dict(GRPC_OPTIONS)
    assert server["grpc.http2.max_ping_strikes"] == 0  # never close a connection for pings
    for client in (dict(GRPC_OPTIONS), dict(CHANNEL_OPTIONS)):
        assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
        assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] < KEEPALIVE_TIME_MS


def _scaled(options, factor: float) -> list[tuple[str, object]]:
    """The options with their keepalive times scaled (the same relation, a faster clock)."""
    times = ("grpc.keepalive_time_ms", "grpc.http2.min_recv_ping_interval_without_data_ms")
    return [(k, int(v * factor) if k in times else v) for k, v in options]


async def _quiet_call(server_options, client_options, quiet_s: float) -> str:
    import grpc

    async def quiet(request, context):
        await asyncio.sleep(quiet_s)  # no headers, no data: a prompt waiting in a queue
        yield b"done"

    server = grpc.aio.server(options=server_options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Quiet", {"Wait": grpc.unary_stream_rpc_method_handler(quiet)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_options) as ch:
            try:
                return b"".join([m async for m in ch.unary_stream("/test.Quiet/Wait")(b"")]).decode()
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
    finally:
        await server.stop(0)


async def test_a_quiet_stream_outlives_the_keepalive_pings():
    """Our options with the clock sped up 20 x (pings every second): a call quiet for 8 s
    completes. The same call against gRPC's server defaults (run alongside) fails, so the
    check is live."""
    factor = 1000 / KEEPALIVE_TIME_MS
    ours = _scaled(GRPC_OPTIONS, factor)
    default_server = [o for o in ours if o[0] not in SERVER_ONLY]
    got, against_default = await asyncio.gather(_quiet_call(ours, ours, quiet_s=8.0),
                                                _quiet_call(default_server, ours, quiet_s=8.0))
    assert got == "done"
    assert against_default.startswith("UNAVAILABLE") and "pings" in against_default.lower()
