"""Pure ASGI middleware that keeps one request from hurting the server or another request:
request ids, the Host allowlist, CORS, the API key, the content type, and the size and
arrival time of request bodies.

Order, outermost first (MetricsMiddleware wraps them all, so every answer here is counted):

1. RequestIdMiddleware: every answer, refusals included, carries an X-Request-Id.
2. Host allowlist (`allowed_hosts`): nothing else answers a DNS-rebound request.
3. CORS (`allowed_origins`): answers preflights, which need no key, and adds its headers to
   refusals too, so that a browser can read them.
4. API key (`api_key`): a client without the key learns nothing more.
5. Content type: POST bodies are JSON.
6. BodyLimitMiddleware: bodies over `max_request_bytes` or slower than
   `request_body_timeout` are refused while they arrive.

A refusal is the OpenAI error body of every other error (`error_response`).
"""

import hmac
import logging
import re
from collections.abc import Callable, Sequence

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xllm.api.errors import APIError, error_response, invalid, quoted
from xllm.api.streaming import new_request_id
from xllm.config import ServerConfig

logger = logging.getLogger("xllm.api")

REQUEST_ID_KEY = "xllm.request_id"  # scope key: the client's usable X-Request-Id, or None
_MADE_ID_KEY = "xllm.made_request_id"  # scope key: the id made up when the client sent none
_USABLE_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces, at most 128 characters
OPEN_PATHS = ("/health", "/metrics")  # the only paths that need no API key
CLOSE = {"Connection": "close"}  # for refusals answered before the body's end was read

Check = Callable[[Scope, Headers], APIError | None]


def usable_id(text: str) -> bool:
    """Whether a client's request id can be used as is: printable ASCII, no spaces, at most
    128 characters."""
    return _USABLE_ID.fullmatch(text) is not None


def header_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id when it is usable, else None."""
    return scope.get(REQUEST_ID_KEY)


def request_id(scope: Scope, prefix: str = "req") -> str:
    """This request's id for logs and answers: the client's, else one made up once (with
    `prefix` if this call makes it, e.g. an endpoint's "chatcmpl")."""
    rid = header_request_id(scope) or scope.get(_MADE_ID_KEY)
    if rid is None:
        rid = scope[_MADE_ID_KEY] = new_request_id(prefix)
    return rid


class RequestIdMiddleware:
    """Keeps a usable client X-Request-Id in the scope and makes sure every answer has an
    X-Request-Id header (one set by the route is kept)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        scope[REQUEST_ID_KEY] = given if given and usable_id(given) else None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id(scope).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RefuseMiddleware:
    """Answers a request with the first error of `checks` (each looks at the headers only),
    closing the connection rather than reading a body it refused; passes it on when there is
    none."""

    def __init__(self, app: ASGIApp, checks: Sequence[Check]) -> None:
        self.app = app
        self.checks = tuple(checks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            for check in self.checks:
                err = check(scope, headers)
                if err is not None:
                    await error_response(err, headers=CLOSE)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def host_check(allowed_hosts: Sequence[str]) -> Check:
    """Refuses (400) a Host header that is not listed, with or without its port."""
    allowed = {host.lower() for host in allowed_hosts}

    def check(scope: Scope, headers: Headers) -> APIError | None:
        host = headers.get("host", "").lower()
        name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
        if host in allowed or name in allowed:
            return None
        return invalid(f"Host {quoted(host)} is not served here")

    return check


def key_check(api_key: str) -> Check:
    """Refuses (401) a request without `Authorization: Bearer <api_key>`, but for
    OPEN_PATHS and OPTIONS (CORS preflights)."""
    expected = api_key.encode()

    def check(scope: Scope, headers: Headers) -> APIError | None:
        if scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, expected):
            return None
        return APIError(401, "A valid API key is required: send `Authorization: Bearer KEY`.",
                        headers={"WWW-Authenticate": "Bearer"})

    return check


def content_type_check(scope: Scope, headers: Headers) -> APIError | None:
    """Refuses (415) a POST whose body is not declared `application/json`; a POST with no
    body and no content type (`curl -X POST /sleep`) passes."""
    if scope["method"] != "POST":
        return None
    content_type = headers.get("content-type")
    if content_type is None:
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if not has_body:
            return None
    elif content_type.partition(";")[0].strip().lower() == "application/json":
        return None
    return APIError(415, "The request body must be JSON (Content-Type: application/json).")


class BodyLimitMiddleware:
    """Refuses a body over `max_bytes` (413: by its Content-Length before it is read, else as
    soon as the chunks received pass the limit) or one not received within `timeout`
    seconds of the first receive (408). Past the body's end, receive is left alone: it then
    only reports the client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is over the limit of {self.max_bytes} bytes.",
                        headers=CLOSE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(self.too_large())(scope, receive, send)
            return
        await self.app(scope, self.limited(receive), send)

    def limited(self, receive: Receive) -> Receive:
        """`receive` counting body bytes and holding to the deadline while chunks are due.
        Its errors are raised in the app, whose APIError handler answers them."""
        received = 0
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_done
            if body_done:
                return await receive()
            if deadline is None:
                deadline = anyio.current_time() + self.timeout
            try:
                with anyio.fail_after(deadline - anyio.current_time()):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, f"The request body did not arrive within {self.timeout:g} s.",
                               headers=CLOSE) from None
            if message["type"] != "http.request":
                body_done = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            body_done = not message.get("more_body", False)
            return message

        return limited_receive


class CORS(CORSMiddleware):
    """Starlette's CORS, whose refused preflights get the OpenAI error body."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        return error_response(invalid(bytes(response.body).decode()))


def add_guards(app: Starlette, config: ServerConfig, vision: bool) -> None:
    """Add the middleware of this module to the Starlette `app`, in the order of the module
    docstring (each add_middleware wraps the ones added before it); `vision`: the server
    takes images."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.request_bytes_limit(vision),
                       timeout=config.request_body_timeout)
    checks: list[Check] = [content_type_check]
    if config.api_key:
        checks.insert(0, key_check(config.api_key))
    else:
        logger.warning("no API key is set: anyone who can reach this server can use it "
                       "(set --api-key or XLLM_API_KEY)")
    app.add_middleware(RefuseMiddleware, checks=checks)
    if config.allowed_origins:
        app.add_middleware(CORS, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    if config.allowed_hosts:
        app.add_middleware(RefuseMiddleware, checks=[host_check(config.allowed_hosts)])
    app.add_middleware(RequestIdMiddleware)
