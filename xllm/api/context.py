"""What every handler needs: the engine, the served name, and the in-flight request limit."""

import logging
import time
import traceback
from dataclasses import dataclass, field

from xllm.api.errors import APIError, from_engine_error
from xllm.api.metrics import Metrics
from xllm.config import ServerConfig
from xllm.engine.errors import EngineError, RequestFailedError
from xllm.engine.protocol import EngineClient

logger = logging.getLogger("xllm.api")


@dataclass
class ServingContext:
    engine: EngineClient
    config: ServerConfig
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                "model",
            )

    def acquire(self) -> None:
        """Count one more request in flight, or 429 when the limit is reached."""
        limit = self.config.max_concurrent_requests
        if self.in_flight >= limit:
            raise APIError(429, f"Too many requests in flight (limit {limit}); retry later.")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


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
