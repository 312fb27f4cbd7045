"""OpenAI-shaped error bodies and the status names of API.md section 5."""

import json
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from xllm.engine.errors import (
    EngineBusyError,
    EngineDeadError,
    EngineError,
    EngineSleepingError,
    InvalidParameter,
)

# HTTP status -> (status name used as `code`, OpenAI error `type`)
_KINDS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "invalid_request_error"),
    401: ("UNAUTHENTICATED", "authentication_error"),
    404: ("UNKNOWN", "not_found_error"),
    # gRPC's UNIMPLEMENTED: the method is not supported on this path
    405: ("UNIMPLEMENTED", "invalid_request_error"),
    # the client did not send its body in time
    408: ("DEADLINE_EXCEEDED", "invalid_request_error"),
    413: ("INVALID_ARGUMENT", "invalid_request_error"),
    415: ("INVALID_ARGUMENT", "invalid_request_error"),
    429: ("RESOURCE_EXHAUSTED", "rate_limit_error"),
    500: ("INTERNAL", "internal_error"),
    503: ("UNAVAILABLE", "service_unavailable_error"),
}


class APIError(Exception):
    """An error the server answers with; `status` picks the code (see `_KINDS`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        code, kind = _KINDS.get(self.status, ("INVALID_ARGUMENT", "invalid_request_error"))
        return {"error": {"message": self.message, "type": kind, "code": code, "param": self.param}}


QUOTE_LIMIT = 40  # characters of a client's value an error message may quote


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value`'s repr for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param)


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=int(err.status),
                        headers={**(err.headers or {}), **(headers or {})})


def error_event(err: APIError) -> str:
    """The SSE event that ends a stream that failed (followed by `data: [DONE]`)."""
    return f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"


def from_validation_error(exc: ValidationError | list[dict]) -> APIError:
    """A 400 naming the first offending field, without echoing the offending value."""
    errors = exc.errors() if isinstance(exc, ValidationError) else list(exc)
    if not errors:
        return invalid("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return invalid(f"malformed JSON body: {msg}")
    if not loc:
        return invalid(f"request body: {msg}")
    return invalid(f"{'.'.join(loc)}: {msg}", param=loc[0])


def from_engine_error(exc: EngineError, names: dict[str, str] | None = None) -> APIError:
    """The answer to a typed engine error; `names` renames engine fields to the request's
    own (e.g. chat's `top_logprobs` for the engine's `logprobs`)."""
    if isinstance(exc, InvalidParameter):
        exc = exc.renamed(names or {})
        return invalid(exc.message, exc.param)
    if isinstance(exc, EngineSleepingError):
        return APIError(503, "The model is asleep; POST /wakeup to serve requests again.")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The server cannot take requests now: {exc}")
    if isinstance(exc, EngineBusyError):
        return invalid(str(exc))
    return APIError(500, "Internal server error.")
