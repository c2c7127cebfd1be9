"""The FastAPI app: OpenAI routes, /tokenize, /detokenize, /health, /metrics, OpenAI-shaped errors.

`create_app(config, worker_pool)` builds it. The app owns the pool's polling from startup
to shutdown (its lifespan starts and closes the pool) and one Prometheus registry.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.frontend.config import FrontendConfig
from splitserve.frontend.errors import OpenAIError, error_body, invalid
from splitserve.frontend.metrics import FrontendMetrics
from splitserve.frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from splitserve.frontend.responses import (
    collect_chat,
    collect_completion,
    stream_chat,
    stream_completion,
)
from splitserve.frontend.serving import (
    RequestTracker,
    ServingState,
    prepare_chat,
    prepare_completion,
    start_events,
    status_of,
)
from splitserve.frontend.sse import ClientDisconnected, SSEResponse, run_until_disconnect
from splitserve.frontend.tokenizer import Tokenizer, load_frontend_tokenizer
from splitserve.frontend.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

#: Paths whose outcomes count in splitserve_requests_total.
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def create_app(
    config: FrontendConfig,
    worker_pool: WorkerPool,
    tokenizer: Tokenizer | None = None,
    *,
    model_name: str | None = None,
    model_max_len: int | None = None,
) -> FastAPI:
    """The frontend app. Without `tokenizer`, loads tokenizer and config of `config.model`
    (never the weights); `model_name`/`model_max_len` go with a tokenizer passed in."""
    if tokenizer is None:
        tokenizer, model_name, model_max_len = load_frontend_tokenizer(config.model)
    names = config.served_model_names or (model_name or config.model,)
    metrics = FrontendMetrics()
    state = ServingState(
        config=config, pool=worker_pool, tokenizer=tokenizer, metrics=metrics,
        model_names=tuple(names), model_max_len=int(model_max_len or 2048),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker_pool.on_stats.append(metrics.observe_pool)
        worker_pool.on_remove.append(metrics.forget_worker)
        routing = None
        if config.router_address is not None:
            from splitserve.router.remote import RemoteRouting

            routing = RemoteRouting(config.router_address, worker_pool,
                                    stats_interval_s=config.stats_interval_s,
                                    retry_after_s=config.retry_after_s)
        elif config.router is not None:
            from splitserve.frontend.routing import KvRouting

            routing = KvRouting(config.router, worker_pool)
        if routing is not None:
            await routing.start()  # before discovery: it follows every worker that joins
            metrics.attach_router(routing.metrics)
            app.state.routing = routing
        sync = None
        if config.discovery_url:
            from splitserve.frontend.discovery_sync import DiscoverySync

            sync = DiscoverySync(worker_pool, config.discovery_url, model=config.model)
            await sync.start()
        await worker_pool.start()
        try:
            yield
        finally:
            if sync is not None:
                await sync.stop()
            if routing is not None:
                await routing.stop()
            await worker_pool.close()

    app = FastAPI(title="splitserve", version="0.1.0", lifespan=lifespan)
    app.state.serving = state
    _install_error_handlers(app, metrics)

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise OpenAIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        start = time.perf_counter()
        job = _counted(metrics, prepare_chat, state, req)
        tracker = RequestTracker(metrics, start)
        tracker.input_tokens = len(job.prompts[0])
        events = start_events(state, job)
        return await _respond(request, tracker, events, req.stream,
                              lambda first: stream_chat(state, job, req, first, events, tracker),
                              lambda: collect_chat(state, job, req, events, tracker))

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        start = time.perf_counter()
        job = _counted(metrics, prepare_completion, state, req)
        tracker = RequestTracker(metrics, start)
        tracker.input_tokens = sum(len(p) for p in job.prompts)
        events = start_events(state, job)
        return await _respond(request, tracker, events, req.stream,
                              lambda first: stream_completion(state, job, req, first, events, tracker),
                              lambda: collect_completion(state, job, req, events, tracker))

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(state, n) for n in state.model_names]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        return _model_card(state, state.check_model(model_id))

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise invalid("give exactly one of 'prompt' or 'messages'", "prompt")
        if req.messages is not None:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
            try:
                tokens = state.tokenizer.encode_chat(msgs)
            except Exception as exc:  # noqa: BLE001
                raise invalid(f"cannot apply the chat template: {exc}", "messages") from None
        else:
            tokens = state.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": state.max_model_len(), "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        vocab = state.tokenizer.vocab_size
        bad = [t for t in req.tokens if not (0 <= t < vocab)]
        if bad:
            raise invalid(f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health():
        counts = worker_pool.counts()
        ok = counts.get("decode", 0) > 0
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": counts},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _counted(metrics: FrontendMetrics, prepare, state: ServingState, req: Any):
    """Run a prepare step; a refusal counts in requests_total before it becomes a response."""
    try:
        return prepare(state, req)
    except OpenAIError as exc:
        metrics.requests.labels(status=status_of(exc)).inc()
        raise


async def _respond(request: Request, tracker: RequestTracker, events, stream: bool,
                   make_stream, make_collect):
    """Stream or collect; the client going away at any point aborts the worker requests."""
    handed_off = False
    try:
        if stream:
            # Wait for the first token so errors before it are real HTTP errors.
            first = await run_until_disconnect(request.receive, anext(events, None))
            handed_off = True
            return SSEResponse(make_stream(first))
        body = await run_until_disconnect(request.receive, make_collect())
        tracker.finish("success")
        return JSONResponse(body)
    except ClientDisconnected:
        tracker.finish("aborted")
        return Response(status_code=499)
    except OpenAIError as exc:
        tracker.finish(status_of(exc))
        raise
    except BaseException:
        tracker.finish("error")
        raise
    finally:
        if not handed_off:
            await events.aclose()


def _model_card(state: ServingState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "splitserve",
        "root": state.config.model,
        "max_model_len": state.max_model_len(),
    }


def _install_error_handlers(app: FastAPI, metrics: FrontendMetrics) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        if request.url.path in _GENERATION_PATHS:
            metrics.requests.labels(status="invalid").inc()
        message, param = describe_validation_error(exc.errors())
        return JSONResponse(error_body(400, message, param=param, code="invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"),
                            status_code=500)


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error, in OpenAI's words."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"Invalid JSON in the request body{': ' + detail if detail else ''}", None
    # Union members show up in loc as type names ("str", "list[int]"); keep field names only.
    names = [str(p) for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]-")
             and str(p) not in ("str", "int", "float", "bool", "dict", "list", "none")]
    path = ".".join(names)
    param = str(loc[0]) if loc else None
    if kind == "missing":
        if not path:
            return "the request needs a JSON body", None
        return f"Missing required parameter: '{path}'", param
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {path}", param
    msg = err.get("msg", "invalid value")
    if not path:
        return f"Invalid request body: {msg}", None
    return f"Invalid value for '{path}': {msg}", param
