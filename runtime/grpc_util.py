"""gRPC plumbing shared by workers and their clients: channel/server options, the
SamplingParams <-> protobuf mapping, and how request errors travel as gRPC status.

A request the engine refuses travels as INVALID_ARGUMENT with the offending parameter in
the trailing metadata key `splitserve-param`; `param_from_error` reads it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep `splitserve --help` free of grpc/protobuf imports
    import grpc

    from splitserve.engine.outputs import EngineStats, RequestOutput
    from splitserve.engine.sampling_params import SamplingParams

#: Trailing-metadata key naming the request field an INVALID_ARGUMENT error is about.
PARAM_METADATA_KEY = "splitserve-param"

#: Messages carry prompts of up to a few hundred thousand token ids; leave room.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Clients ping every KEEPALIVE_TIME_MS to notice a dead peer (the router's event-plane
#: channels too); servers accept pings that often on a quiet connection.
KEEPALIVE_TIME_MS = 20_000

#: The keepalive of every client of ours (request and event planes), and no proxy even when
#: the environment names one (a loopback or cluster-local plane).
KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # a call or subscription may stay quiet long
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_http_proxy", 0),
)

#: Options for every channel and server of the request plane (and the servers of the event
#: plane). The server side: gRPC's default refuses pings more often than every 5 min while
#: it sends no data, and after 2 such "strikes" closes the connection (GOAWAY
#: too_many_pings), failing a call still waiting for its first message (a queued prompt).
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)


def sampling_params_to_proto(params: "SamplingParams") -> Any:
    from splitserve.proto import worker_pb2

    msg = worker_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def sampling_params_from_proto(msg: Any) -> "SamplingParams":
    """Build engine SamplingParams; raises EngineInputError for out-of-range values."""
    from splitserve.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=int(msg.max_tokens),
        temperature=float(msg.temperature),
        top_p=float(msg.top_p),
        top_k=int(msg.top_k),
        min_p=float(msg.min_p),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
        logprobs=int(msg.logprobs) if msg.HasField("logprobs") else None,
        presence_penalty=float(msg.presence_penalty),
        frequency_penalty=float(msg.frequency_penalty),
    )


def token_logprob_to_proto(lp: Any, msg: Any) -> Any:
    """Fill a proto TokenLogprob `msg` from an engine TokenLogprob."""
    msg.token_id = lp.token_id
    msg.logprob = lp.logprob
    for tid, tlp in lp.top:
        msg.top.add(token_id=tid, logprob=tlp)
    return msg


def token_logprob_from_proto(msg: Any) -> Any:
    from splitserve.engine.outputs import TokenLogprob

    return TokenLogprob(int(msg.token_id), float(msg.logprob),
                        tuple((int(t.token_id), float(t.logprob)) for t in msg.top))


def request_output_to_proto(out: "RequestOutput") -> Any:
    from splitserve.proto import worker_pb2

    msg = worker_pb2.GenerateResponse(
        token_ids=out.new_token_ids,
        finished=out.finished,
        finish_reason=out.finish_reason or "",
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        error=out.error or "",
    )
    for lp in out.logprobs:
        token_logprob_to_proto(lp, msg.logprobs.add())
    return msg


def stats_to_proto(
    stats: "EngineStats",
    *,
    worker_id: str,
    role: str,
    model: str,
    max_model_len: int,
    num_active_requests: int,
    **extra: Any,
) -> Any:
    """`extra`: further StatsResponse fields (disaggregation counters)."""
    from splitserve.proto import worker_pb2

    return worker_pb2.StatsResponse(
        worker_id=worker_id,
        role=role,
        model=model,
        num_waiting=stats.num_waiting,
        num_running=stats.num_running,
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks,
        block_size=stats.block_size,
        max_model_len=max_model_len,
        num_active_requests=num_active_requests,
        **extra,
    )


def param_from_error(err: "grpc.aio.AioRpcError | grpc.RpcError") -> str | None:
    """The `splitserve-param` trailing metadata of a failed call, if any."""
    try:
        md = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - some error objects carry no metadata
        return None
    for item in md:
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key == PARAM_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def loopback_target(host: str, port: int) -> str:
    """`host:port` for a gRPC target, bracketing IPv6 literals."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
