"""The FastAPI app: routes, body parsing into the protocol models, and error handlers."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xllm.api.chat import create_chat_completion
from xllm.api.completions import create_completion
from xllm.api.context import ServingContext, log_internal_error
from xllm.api.errors import APIError, error_response, from_validation_error
from xllm.api.protocol import ChatCompletionRequest, CompletionRequest
from xllm.api.streaming import new_request_id

logger = logging.getLogger("xllm.api")


async def guarded(work):
    """Await a handler; a fault that is not an APIError becomes a logged 500."""
    try:
        return await work
    except APIError:
        raise
    except Exception as exc:
        request_id = new_request_id("req")
        log_internal_error(exc, request_id)
        raise APIError(500, f"Internal server error (request {request_id}).") from None


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body validated into `model`; any fault is a 400."""
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def build_app(engine, served_model_name: str, max_concurrent_requests: int = 256) -> FastAPI:
    """The HTTP app serving `engine` (an AsyncEngine, started by the caller) as
    `served_model_name`."""
    app = FastAPI(title="xllm", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = ServingContext(engine, served_model_name, max_concurrent_requests)
    app.state.ctx = ctx

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
        return await guarded(create_chat_completion(ctx, req, request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        return await guarded(create_completion(ctx, req, request))

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
        if engine.is_healthy():
            return JSONResponse({"status": "healthy"})
        reason = getattr(engine, "dead_reason", None) or "engine is not running"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    return app
