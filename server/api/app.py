"""The HTTP app: routes over one serving class per endpoint, errors as OpenAI error bodies,
the body and concurrency limits, auth, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ranker.batching import BatchScorer
from ranker.engine import Engine
from ranker.scorer import SRRScorer
from server.api import metrics
from server.api.config import Settings
from server.api.protocol import (
    APIError, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    ErrorBody, ErrorResponse, ModelCard, ModelList, ResponseObject, ResponsesRequest, ScoreRequest,
    ScoreResponse, completion_id, text_completion_id,
)
from server.api.serving_chat import ServingChat, stream as chat_stream, stream_early as chat_stream_early
from server.api.serving_completion import (
    ServingCompletion, stream as completion_stream, stream_early as completion_stream_early,
)
from server.api.serving_responses import (
    ServingResponses, stream as responses_stream, stream_early as responses_stream_early,
)
from server.api.serving_score import ServingScore
from server.api.streaming import EarlyStream

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, chunked uploads included."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"request body exceeds {self.max_bytes} bytes",
                                 code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable):
    """Run `work`, cancelling it (and so aborting its vLLM requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")


DEAD_ENGINE_DRAIN_S = 2.0


@dataclass
class Servings:
    """The endpoints' handlers over one engine."""

    engine: Engine
    chat: ServingChat
    completion: ServingCompletion
    responses: ServingResponses
    score: ServingScore

    @property
    def model_name(self) -> str:
        return self.engine.served_model_name


def build_servings(settings: Settings, engine: Engine, scorer: SRRScorer) -> Servings:
    batch = BatchScorer(scorer)  # one per process: concurrent requests share its forwards
    chat = ServingChat(settings, engine, scorer, batch)
    return Servings(engine, chat, ServingCompletion(settings, engine, scorer, batch),
                    ServingResponses(chat), ServingScore(settings, engine, scorer, batch))


def create_app(settings: Settings, build_service: Callable[[], Awaitable[Servings]],
               on_engine_dead: Callable[[], None] | None = None) -> FastAPI:
    state: dict = {"service": None, "in_flight": 0}

    async def watch_engine() -> None:
        while state["service"].engine.is_alive():
            await asyncio.sleep(1.0)
        logger.error("the vLLM engine died; /health answers 503, exiting in %.0f s", DEAD_ENGINE_DRAIN_S)
        # Exit only after a drain: a probe or load balancer polling /health then sees 503
        # rather than a server that was healthy a moment ago and is simply gone.
        await asyncio.sleep(DEAD_ENGINE_DRAIN_S)
        if on_engine_dead is not None:
            on_engine_dead()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["service"] = await build_service()
        watchdog = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            watchdog.cancel()
            state["service"].engine.shutdown()

    app = FastAPI(title="SRR server", version="0.1.0", lifespan=lifespan)
    app.state.srr = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def service() -> Servings:
        return state["service"]

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "Invalid or missing API key (Authorization: Bearer ...)",
                           "authentication_error", code="invalid_api_key")

    def open_or_authorized(request: Request) -> None:
        if settings.protect_metrics:
            authorize(request)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", []) if p != "body"]
        # Never echo the input back: it may hold prompt text.
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return error_response(400, msg, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail),
                              "not_found_error" if e.status_code == 404 else "invalid_request_error")

    async def limited(start: Callable[[], Awaitable]):
        """Past the limit answer 429 at once rather than queueing without bound."""
        if state["in_flight"] >= settings.max_concurrent_requests:
            raise APIError(429, "Too many concurrent requests; retry later", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        state["in_flight"] += 1
        metrics.IN_FLIGHT.inc()
        try:
            return await start()
        finally:
            state["in_flight"] -= 1
            metrics.IN_FLIGHT.dec()

    @app.get("/health")
    async def health(_: None = Depends(open_or_authorized)):
        svc = state["service"]
        if svc is None or not svc.engine.is_alive():
            return error_response(503, "engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(_: None = Depends(open_or_authorized)):
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models(_: None = Depends(authorize), svc: Servings = Depends(service)):
        return ModelList(data=[ModelCard(id=svc.model_name)])

    errors = {status: {"model": ErrorResponse} for status in (400, 404, 429, 503)}

    async def generate(request: Request, create: Callable[[], Awaitable]):
        """One selection, answered whole."""
        return await limited(lambda: until_disconnected(request, create()))

    async def streamed(request: Request, early: EarlyStream, create: Callable[[], Awaitable],
                       whole: Callable[[Any], Iterator[str]],
                       from_commit: Callable[[str, asyncio.Future], AsyncIterator[str]]):
        """One selection as the endpoint's event stream: from the guard's commit if it commits
        (`create` sends the winner's text to `early`), else whole once selection is done. An
        error before the stream begins is still a JSON error."""
        work = asyncio.ensure_future(limited(lambda: until_disconnected(request, create())))
        first = asyncio.ensure_future(early.pieces.get())
        await asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            first.cancel()
            return StreamingResponse(whole(work.result()), media_type="text/event-stream")
        return StreamingResponse(from_commit(first.result(), work), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def chat(body: ChatCompletionRequest, request: Request,
                   _: None = Depends(authorize), svc: Servings = Depends(service)):
        if not body.stream:
            return await generate(request, lambda: svc.chat.create(body))
        usage = bool(body.stream_options and body.stream_options.include_usage)
        early = EarlyStream(completion_id())
        return await streamed(request, early, lambda: svc.chat.create(body, early),
                              lambda result: chat_stream(result, usage),
                              lambda first, work: chat_stream_early(early, first, work, svc.model_name, usage))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=errors)
    async def completions(body: CompletionRequest, request: Request,
                          _: None = Depends(authorize), svc: Servings = Depends(service)):
        if not body.stream:
            return await generate(request, lambda: svc.completion.create(body))
        early = EarlyStream(text_completion_id())
        return await streamed(request, early, lambda: svc.completion.create(body, early), completion_stream,
                              lambda first, work: completion_stream_early(early, first, work, svc.model_name))

    @app.post("/v1/responses", response_model=ResponseObject, responses=errors)
    async def responses(body: ResponsesRequest, request: Request,
                        _: None = Depends(authorize), svc: Servings = Depends(service)):
        if not body.stream:
            return await generate(request, lambda: svc.responses.create(body))
        early = EarlyStream(completion_id())  # the chat completion underneath
        return await streamed(request, early, lambda: svc.responses.create(body, early), responses_stream,
                              lambda first, work: responses_stream_early(body, early, first, work, svc.model_name))

    @app.post("/v1/srr/score", response_model=ScoreResponse,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def score(body: ScoreRequest, request: Request,
                    _: None = Depends(authorize), svc: Servings = Depends(service)):
        return await limited(lambda: until_disconnected(request, svc.score.create(body)))

    return app

