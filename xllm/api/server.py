"""The FastAPI app: routes, body parsing into the protocol models, and error handlers."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xllm.api.chat import prepare_chat
from xllm.api.completions import prepare_completion
from xllm.api.context import ServingContext, api_error, log_internal_error
from xllm.api.errors import APIError, error_response, from_validation_error, invalid
from xllm.api.generate import serve_generation
from xllm.api.metrics import CONTENT_TYPE, MetricsMiddleware
from xllm.api.protocol import ChatCompletionRequest, CompletionRequest
from xllm.api.streaming import new_request_id
from xllm.config import ServerConfig
from xllm.engine.protocol import EngineClient

logger = logging.getLogger("xllm.api")


async def guarded(work):
    """Await a handler; a typed engine error becomes its answer, any other fault that is
    not an APIError a logged 500."""
    try:
        return await work
    except Exception as exc:
        raise api_error(exc, new_request_id("req")) from None


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
    except ValueError:
        raise invalid("malformed JSON body") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object")
    level = data.get("level", 1)
    if isinstance(level, bool) or level not in (1, 2):
        raise invalid("level must be 1 or 2", "level")
    return level


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The HTTP app serving `engine` (an AsyncEngine, started by the caller) as
    `config.served_model_name`."""
    app = FastAPI(title="xllm", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = ServingContext(engine, config)
    app.state.ctx = ctx
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)

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
        if status == 404:
            err.message = f"no route {request.method} {request.url.path}"
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = new_request_id("req")
        log_internal_error(exc, request_id)
        return error_response(APIError(500, f"Internal server error (request {request_id})."))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        return await guarded(serve_generation(ctx, request, req, prepare_chat))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        return await guarded(serve_generation(ctx, request, req, prepare_completion))

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
        await guarded(engine.sleep(level))  # a request slipped in: EngineBusyError, a 400
        logger.info("model asleep (level %d)", level)
        return JSONResponse({"status": "sleeping", "level": level})

    @app.post("/wakeup")
    async def wakeup() -> JSONResponse:
        check_idle("wake up")
        await guarded(engine.wake_up())
        logger.info("model awake")
        return JSONResponse({"status": "awake"})

    return app
