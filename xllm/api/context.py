"""What every handler needs: the engine, the served name, and the in-flight sequence limit."""

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from xllm.api.errors import APIError, from_engine_error
from xllm.api.media import MediaConfig
from xllm.api.metrics import Metrics
from xllm.config import ServerConfig
from xllm.engine.errors import EngineError, RequestFailedError
from xllm.engine.protocol import EngineClient

logger = logging.getLogger("xllm.api")

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


@dataclass
class ServingContext:
    engine: EngineClient
    config: ServerConfig
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # sequences (choices of every prompt) of the requests in flight
    draining: bool = False  # set on shutdown: no new request is taken
    metrics: Metrics = field(default_factory=Metrics)
    media: MediaConfig = field(init=False)  # where image URLs may be fetched from

    def __post_init__(self) -> None:
        local = self.config.allowed_local_media_path
        self.media = MediaConfig(
            allowed_domains=self.config.allowed_media_domains,
            allowed_local_path=Path(local).resolve() if local else None,
            fetch_timeout=self.config.media_fetch_timeout,
            max_bytes=self.config.max_image_bytes)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                "model",
            )

    def acquire(self, count: int = 1) -> None:
        """Count `count` more sequences in flight; 503 while shutting down, 429 when they
        would pass the limit (a request larger than the limit is a 400: it never fits)."""
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.")
        limit = self.config.max_concurrent_requests
        if count > limit:
            raise APIError(400, f"This request needs {count} sequences (prompts times n), "
                           f"more than the server runs at once ({limit}).", "n")
        if self.in_flight + count > limit:
            raise APIError(429, f"Too many sequences in flight (limit {limit}); retry later.",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += count

    def release(self, count: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - count)


def api_error(exc: BaseException, request_id: str, names: dict[str, str] | None = None
              ) -> APIError:
    """The error sent back for an exception raised while serving `request_id`: typed engine
    errors by their type (`names` renames engine fields to the request's own); any other
    fault is logged and becomes a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError) and not isinstance(exc, RequestFailedError):
        return from_engine_error(exc, names)
    log_internal_error(exc, request_id)
    return APIError(500, f"Internal server error (request {request_id}).")


def log_internal_error(exc: BaseException, request_id: str) -> None:
    """Log where a fault happened, with the request id only: frames, not the message,
    which might quote user content."""
    while isinstance(exc, RequestFailedError) and exc.__cause__ is not None:
        exc = exc.__cause__
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("request %s: internal error %s\n%s", request_id, type(exc).__name__, frames)
