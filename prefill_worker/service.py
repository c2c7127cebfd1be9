"""The `Worker` gRPC service of a prefill worker.

Lifecycle of one Prefill call:
1. the prompt runs through the engine with max_tokens=1 and its KV blocks pinned;
2. the answer carries the first token and, unless that token already ends the request,
   a KV handle (this worker's id, address and transport name, the block ids, the token
   count);
3. the blocks stay pinned until the decode worker's transport notice arrives (it pulled
   them), a ReleaseKv call, or the pin timeout (counted in `num_expired_pins`).
A cancelled Prefill call aborts the request and frees its blocks at once. Generate works
too (the worker then serves like a decode worker).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from splitserve.decode_worker.service import WorkerServicer, _abort_invalid
from splitserve.engine.errors import EngineInputError
from splitserve.proto import worker_pb2
from splitserve.runtime.grpc_util import (
    request_output_to_proto,
    sampling_params_from_proto,
    token_logprob_to_proto,
)

logger = logging.getLogger(__name__)


class PrefillWorkerServicer(WorkerServicer):
    def __init__(self, engine: Any, *, worker_id: str, role: str, model_name: str,
                 transport: Any = None, pin_timeout_s: float = 30.0, address: str = "",
                 **kwargs: Any) -> None:
        super().__init__(engine, worker_id=worker_id, role=role, model_name=model_name,
                         transport=transport, **kwargs)
        self.pin_timeout_s = pin_timeout_s
        self.address = address
        self._notify_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Consume transport notices (pulled → free the blocks) for the worker's life. On
        NIXL this loop also drives the agent's progress that a first pull waits on."""
        if self.transport is not None and self._notify_task is None:
            self._notify_task = asyncio.create_task(self._consume_notifications())

    async def stop(self) -> None:
        if self._notify_task is not None:
            task, self._notify_task = self._notify_task, None
            task.cancel()
            # Bounded: the transport's close (which ends the loop for good) comes after this.
            await asyncio.wait((task,), timeout=5.0)
            if not task.done():
                logger.warning("the transport notification loop did not end on cancel; "
                               "closing the transport ends it")
            elif not task.cancelled() and task.exception() is not None:
                logger.debug("notification loop ended with an error", exc_info=task.exception())
        await super().stop()

    async def _consume_notifications(self) -> None:
        """Free each pulled request's blocks. The release is posted, not awaited: awaiting
        it would park this loop behind the engine's running step, and the loop's polling is
        also what drives this transport's progress while a decode worker reads."""
        async for note in self.transport.notifications(expecting=self._has_pinned):
            rid = note.msg.decode(errors="replace")
            try:
                self.engine.post(lambda e, rid=rid: e.release_pinned(rid))
            except Exception:  # noqa: BLE001 - engine going down
                logger.debug("release of %s failed", rid, exc_info=True)

    def _pinned(self) -> dict:
        """The engine's pinned prefills by request id (read from this thread: a dict
        lookup, no trip to the engine thread)."""
        eng = getattr(self.engine, "engine", None)
        return eng.scheduler.pinned if eng is not None else {}

    def _has_pinned(self) -> bool:
        return bool(self._pinned())

    def extra_stats(self) -> dict[str, Any]:
        out = super().extra_stats()
        out["num_expired_pins"] = getattr(self.engine, "num_expired_pins", 0)
        out["num_pinned"] = len(self._pinned())
        return out

    # -- RPCs ----------------------------------------------------------------------------
    async def Prefill(self, request, context):  # noqa: N802 - gRPC method name
        import grpc

        rid = request.request_id
        if not self._serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        if self.transport is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"prefill worker {self.worker_id} has no KV transport")
        try:
            params = sampling_params_from_proto(request.sampling_params)
        except EngineInputError as exc:
            await _abort_invalid(context, str(exc), exc.param)
        first = None
        self._active.add(rid)
        try:
            try:
                async for out in self.engine.generate(
                    rid, list(request.prompt_token_ids), replace(params, max_tokens=1),
                    pin_timeout_s=self.pin_timeout_s,
                ):
                    first = out
            except EngineInputError as exc:
                await _abort_invalid(context, str(exc), exc.param)
        finally:
            self._active.discard(rid)
        # Releases are posted, and the blocks come with the output: awaiting the engine
        # thread here would hold this answer (the TTFT) until the next prompt's step ends.
        if first is None or first.finish_reason not in ("stop", "length"):
            self.engine.post(lambda e: e.release_pinned(rid))
            reason = first.error if first is not None and first.error else "aborted"
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} failed: {reason}")
        msg = request_output_to_proto(first)
        ends_here = first.finish_reason == "stop" or params.max_tokens <= 1
        if ends_here:
            self.engine.post(lambda e: e.release_pinned(rid))
            msg.finish_reason = first.finish_reason if first.finish_reason == "stop" else "length"
            return worker_pb2.PrefillResponse(first=msg)
        msg.finished = False
        msg.finish_reason = ""
        if first.kv_blocks is None:  # the engine pins every prefill that ends by length
            self.engine.post(lambda e: e.release_pinned(rid))
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} left no pinned KV blocks")
        block_ids, n = first.kv_blocks
        handle = worker_pb2.KvHandle(
            worker_id=self.worker_id, agent_name=self.transport.name, block_ids=block_ids,
            num_tokens=n, first_token=first.new_token_ids[0], address=self.address,
        )
        if first.logprobs:
            token_logprob_to_proto(first.logprobs[0], handle.first_logprob)
        self.transport.wake()  # the notification loop may be in its idle wait
        return worker_pb2.PrefillResponse(first=msg, kv_handle=handle)

    async def TransportInfo(self, request, context):  # noqa: N802
        import grpc

        if self.transport is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no KV transport")
        return worker_pb2.TransportInfoResponse(
            kind=self.transport.kind, metadata=self.transport.local_metadata(),
            worker_id=self.worker_id)

    async def ReleaseKv(self, request, context):  # noqa: N802
        # Posted, not awaited (that would wait out the running step); `released` says
        # whether the request was pinned when asked.
        rid = request.request_id
        pinned = rid in self._pinned()
        self.engine.post(lambda e: e.release_pinned(rid))
        return worker_pb2.ReleaseKvResponse(released=pinned)
