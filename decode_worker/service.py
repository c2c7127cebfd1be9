"""The `Worker` gRPC service of a decode worker: one AsyncEngine behind Generate/Abort/Stats/Health.

Lifecycle of one Generate call:
1. the request arrives with token ids and sampling params; bad params or a prompt the
   engine refuses end the call with INVALID_ARGUMENT (`splitserve-param` trailing metadata
   names the field) before any token is sent;
2. the engine prefills locally (the aggregated mode) and each engine output is sent as one
   GenerateResponse as soon as it is produced;
3. the call ends after the message with `finished = true`; if the client cancels first
   (disconnect, stop string matched) the engine request is aborted at once and its KV
   blocks are freed; `Abort` from a separate call ends the stream with finish_reason
   "abort" and frees the blocks too.

A request carrying a KV handle (remote prefill, issue 4) goes through `_open_stream`, the
hook a KV transport plugs into; without one the worker prefills the prompt plus the handle's
first token itself, so the request still succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from splitserve.engine.errors import EngineInputError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2, worker_pb2_grpc
from splitserve.runtime.aio import spawn_tracked
from splitserve.runtime.grpc_util import (
    PARAM_METADATA_KEY,
    request_output_to_proto,
    sampling_params_from_proto,
    stats_to_proto,
)

logger = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one engine; generic over the worker role (a prefill servicer extends it)."""

    def __init__(self, engine: Any, *, worker_id: str, role: str, model_name: str,
                 transport: Any = None, pull_timeout_s: float = 10.0) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.role = role
        self.model_name = model_name
        #: KV transport (splitserve.kv_transfer) for requests carrying a KV handle.
        self.transport = transport
        self.pull_timeout_s = pull_timeout_s
        #: transport peer name by the prefill worker's agent name (a restarted worker that
        #: keeps its id comes back with a new agent, so it is asked again).
        self._peers: dict[str, str] = {}
        self.num_kv_pulls = 0
        self.num_kv_pull_failures = 0
        #: request ids inside a Generate call right now.
        self._active: set[str] = set()
        self._serving = True
        #: one channel per prefill worker address (TransportInfo, ReleaseKv), closed on stop().
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: ReleaseKv calls under way (finished before stop() closes the channels).
        self._releasing: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------
    def set_serving(self, serving: bool) -> None:
        """False while draining: Health says NOT_SERVING and new Generate calls are refused."""
        self._serving = serving

    @property
    def num_active(self) -> int:
        return len(self._active)

    async def stop(self) -> None:
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=3.0)
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()

    def _prefill_stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        """A stub on the (cached) channel to the prefill worker at `address`."""
        ch = self._channels.get(address)
        if ch is None:
            from splitserve.runtime.grpc_util import GRPC_OPTIONS

            ch = self._channels[address] = grpc.aio.insecure_channel(address, options=list(GRPC_OPTIONS))
        return worker_pb2_grpc.WorkerStub(ch)

    # -- RPCs ------------------------------------------------------------------------
    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        rid = request.request_id
        if not self._serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        if not rid:
            await _abort_invalid(context, "request_id must be set", "request_id")
        if rid in self._active:
            await _abort_invalid(context, f"request_id {rid!r} is already running", "request_id")
        try:
            params = sampling_params_from_proto(request.sampling_params)
        except EngineInputError as exc:
            await _abort_invalid(context, str(exc), exc.param)
        self._active.add(rid)
        finished = False
        try:
            stream = self._open_stream(request, params)
            async with contextlib.aclosing(stream):
                try:
                    async for out in stream:
                        finished = finished or out.finished
                        yield request_output_to_proto(out)
                        if out.finished:
                            break
                except EngineInputError as exc:
                    await _abort_invalid(context, str(exc), exc.param)
        except asyncio.CancelledError:
            logger.debug("Generate %s cancelled by the client", rid)
            raise
        finally:
            self._active.discard(rid)
            if not finished:
                # Client went away (or an error): free the request's blocks now.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engine.abort(rid))

    async def Abort(self, request, context):  # noqa: N802
        # The engine frees the blocks and ends the request's stream with finish_reason "abort".
        with contextlib.suppress(Exception):
            await self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse()

    async def Stats(self, request, context):  # noqa: N802
        return stats_to_proto(
            self.engine.stats(),
            worker_id=self.worker_id,
            role=self.role,
            model=self.model_name,
            max_model_len=int(self.engine.max_model_len),
            num_active_requests=self.num_active,
            **self.extra_stats(),
        )

    def extra_stats(self) -> dict[str, Any]:
        """Role-specific StatsResponse fields."""
        return {
            "num_kv_pulls": self.num_kv_pulls,
            "num_kv_pull_failures": self.num_kv_pull_failures,
            "kv_transport": getattr(self.transport, "kind", "") or "",
        }

    async def Health(self, request, context):  # noqa: N802
        status = (
            worker_pb2.HealthResponse.SERVING
            if self._serving
            else worker_pb2.HealthResponse.NOT_SERVING
        )
        return worker_pb2.HealthResponse(status=status, role=self.role, worker_id=self.worker_id)

    # -- hooks -----------------------------------------------------------------------
    def _open_stream(self, request, params: SamplingParams) -> AsyncIterator[Any]:
        """The engine stream for one request; a KV transport overrides this for kv_handle."""
        prompt = list(request.prompt_token_ids)
        if request.HasField("kv_handle"):
            if self.transport is not None:
                return self._remote_stream(request, prompt, params)
            return self._local_fallback(request, prompt, params)
        return self.engine.generate(request.request_id, prompt, params)

    def _remote_stream(self, request, prompt: list[int], params: SamplingParams):
        """Admit the request with the prefill's first token, pull the KV blocks this
        worker's prefix cache lacks, then decode. Any pull failure (peer gone, transfer
        error, timeout) falls back to a local prefill, so the request still succeeds."""
        from splitserve.runtime.grpc_util import token_logprob_from_proto

        handle = request.kv_handle
        rid = request.request_id
        first_lp = (token_logprob_from_proto(handle.first_logprob)
                    if handle.HasField("first_logprob") else None)

        async def pull(plan: list[tuple[int, int]] | None) -> bool:
            # []: every block is in our prefix cache; None: our pool is short and the prompt
            # is prefilled here. Either way nothing moves and the prefill side lets go.
            if not plan:
                self._release_remote_soon(handle, rid)
                return True
            try:
                peer = await self._peer(handle)
                await self.transport.pull(
                    peer, [handle.block_ids[i] for i, _ in plan], [b for _, b in plan],
                    notify_msg=rid.encode(), timeout_s=self.pull_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - any failure means: prefill here
                self.num_kv_pull_failures += 1
                logger.warning("KV pull of %s from %s failed (%s: %s); prefilling locally",
                               rid, handle.worker_id, type(exc).__name__, exc)
                self._release_remote_soon(handle, rid)
                return False
            self.num_kv_pulls += 1
            return True

        return self.engine.generate_remote(rid, prompt, params, int(handle.first_token), pull,
                                           first_logprob=first_lp)

    async def _peer(self, handle) -> str:
        """Our transport's peer name for the prefill worker of `handle` (asked once)."""
        known = self._peers.get(handle.agent_name)
        if known is not None:
            return known
        info = await self._prefill_stub(handle.address).TransportInfo(
            worker_pb2.TransportInfoRequest(), timeout=self.pull_timeout_s)
        peer = await self.transport.add_peer(info.metadata)
        self._peers[handle.agent_name] = peer
        return peer

    def _release_remote_soon(self, handle, rid: str) -> None:
        """_release_remote in the background: the request goes on without waiting for it."""
        spawn_tracked(self._releasing, self._release_remote(handle, rid), f"release-{rid}")

    async def _release_remote(self, handle, rid: str) -> None:
        """Tell the prefill worker to free the request's pinned blocks (best effort)."""
        try:
            await self._prefill_stub(handle.address).ReleaseKv(
                worker_pb2.ReleaseKvRequest(request_id=rid), timeout=2.0)
        except Exception:  # noqa: BLE001 - its pin timeout frees the blocks anyway
            logger.debug("ReleaseKv of %s at %s failed", rid, handle.address, exc_info=True)

    async def _local_fallback(self, request, prompt: list[int], params: SamplingParams):
        """No KV transport: prefill prompt + the handle's first token here (same result)."""
        handle = request.kv_handle
        logger.warning(
            "request %s carries a KV handle from %s but this worker has no KV transport; "
            "prefilling locally", request.request_id, handle.worker_id or "?",
        )
        if params.max_tokens <= 1:
            # The prefill side already produced the only token asked for.
            from splitserve.engine.outputs import RequestOutput

            yield RequestOutput(
                request_id=request.request_id, new_token_ids=[], finished=True,
                finish_reason="length", num_prompt_tokens=len(prompt),
            )
            return
        from dataclasses import replace

        rest = replace(params, max_tokens=params.max_tokens - 1)
        async for out in self.engine.generate(
            request.request_id, prompt + [int(handle.first_token)], rest
        ):
            yield out


async def _abort_invalid(context, message: str, param: str | None) -> None:
    if param:
        context.set_trailing_metadata(((PARAM_METADATA_KEY, param),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
