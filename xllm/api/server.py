"""The FastAPI app: routes, body parsing into the protocol models, and error handlers."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from xllm.api.chat import prepare_chat
from xllm.api.completions import prepare_completion
from xllm.api.context import ServingContext, api_error
from xllm.api.errors import APIError, error_response, from_validation_error, invalid, quoted
from xllm.api.generate import serve_generation
from xllm.api.guards import add_guards, request_id
from xllm.api.metrics import CLIENT_CLOSED, CONTENT_TYPE, MetricsMiddleware
from xllm.api.protocol import ChatCompletionRequest, CompletionRequest, SampleRequest
from xllm.api.sample import prepare_sample
from xllm.config import ServerConfig
from xllm.engine.protocol import EngineClient

logger = logging.getLogger("xllm.api")


async def guarded(request: Request, work):
    """Await a handler; a typed engine error becomes its answer, any other fault that is
    not an APIError a logged 500."""
    try:
        return await work
    except Exception as exc:
        raise api_error(exc, request_id(request.scope)) from None


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body validated into `model`; any fault is a 400."""
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def sleep_level(request: Request) -> int:
    """The `level` of a POST /sleep body (optional; 1 when absent)."""
    body = await request.body()
    if not body.strip():
        return 1
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise invalid("malformed JSON body") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object")
    level = data.get("level", 1)
    if type(level) is not int or level not in (1, 2):  # not True, not 1.0
        raise invalid(f"level must be the integer 1 or 2, got {quoted(level)}", "level")
    return level


class InternalErrors:
    """Pure ASGI middleware: a fault of a route becomes a logged 500 with the OpenAI body
    here, so that it never reaches the server's own log, which would print its message
    (and a message may quote a prompt)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_marked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_marked)
        except Exception as exc:
            if scope["type"] != "http" or started:
                raise
            err = api_error(exc, request_id(scope))
            await error_response(err)(scope, receive, send)


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The HTTP app serving `engine` (an AsyncEngine, started by the caller) as
    `config.served_model_name`."""
    app = FastAPI(title="xllm", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = ServingContext(engine, config)
    app.state.ctx = ctx
    app.add_middleware(InternalErrors)  # innermost: a route's fault never reaches uvicorn
    add_guards(app, config, engine.vision is not None)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)  # outermost: counts all

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        err = APIError(status, str(exc.detail))
        route = quoted(f"{request.method} {request.url.path}")
        if status == 404:
            err.message = f"No route {route}."
        elif status == 405:
            err.message = f"Method not allowed: {route}."
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        logger.info("request %s: client went away before its body was read",
                    request_id(request.scope))
        return Response(status_code=CLIENT_CLOSED)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        return await guarded(request, serve_generation(ctx, request, req, prepare_chat))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        return await guarded(request, serve_generation(ctx, request, req, prepare_completion))

    @app.post("/v1/sample")
    async def sample(request: Request) -> Response:
        req = await parse_body(request, SampleRequest)
        return await guarded(request, serve_generation(ctx, request, req, prepare_sample))

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{
                "id": ctx.model_name,
                "object": "model",
                "created": ctx.created,
                "owned_by": "xllm",
                "max_model_len": engine.max_model_len,
            }],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        if ctx.draining:
            return JSONResponse({"status": "unhealthy", "reason": "shutting down"},
                                status_code=503)
        if engine.is_healthy():
            # awake: exactly API.md's body; asleep: still healthy, and says so
            return JSONResponse({"status": "healthy", "sleeping": True} if engine.is_sleeping
                                else {"status": "healthy"})
        reason = engine.dead_reason or "engine is not running"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = ctx.metrics.render(engine.stats(), sleeping=engine.is_sleeping)
        return Response(text, media_type=None, headers={"Content-Type": CONTENT_TYPE})

    def check_idle(action: str) -> None:
        if ctx.in_flight:
            raise invalid(f"cannot {action} while {ctx.in_flight} request(s) are in flight; "
                          "retry when they are done")

    @app.post("/sleep")
    async def sleep(request: Request) -> JSONResponse:
        level = await sleep_level(request)
        check_idle("sleep")
        await guarded(request, engine.sleep(level))  # a request slipped in: EngineBusyError, a 400
        logger.info("model asleep (level %d)", level)
        return JSONResponse({"status": "sleeping", "level": level})

    @app.post("/wakeup")
    async def wakeup(request: Request) -> JSONResponse:
        check_idle("wake up")
        await guarded(request, engine.wake_up())
        logger.info("model awake")
        return JSONResponse({"status": "awake"})

    return app
