"""What every handler needs: the engine, the served name, and the in-flight request limit."""

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from xllm.api.errors import APIError
from xllm.api.metrics import Metrics
from xllm.engine.async_engine import EngineSleepingError

logger = logging.getLogger("xllm.api")


@dataclass
class ServingContext:
    engine: Any  # xllm.engine.async_engine.AsyncEngine (or anything with its interface)
    model_name: str
    max_concurrent_requests: int = 256
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                "model",
            )

    @property
    def sleeping(self) -> bool:
        return bool(getattr(self.engine, "is_sleeping", False))

    def check_ready(self) -> None:
        if not self.engine.is_healthy():
            reason = getattr(self.engine, "dead_reason", None) or "engine is not running"
            raise APIError(503, f"The server cannot take requests now: {reason}")
        if self.sleeping:
            raise APIError(503, "The model is asleep; POST /wakeup to serve requests again.")

    def acquire(self) -> None:
        """Count one more request in flight, or 429 when the limit is reached."""
        if self.in_flight >= self.max_concurrent_requests:
            raise APIError(
                429, f"Too many requests in flight (limit {self.max_concurrent_requests}); "
                "retry later.",
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def engine_error(self, exc: BaseException, request_id: str) -> APIError:
        """Map an exception raised while serving `request_id` to the error sent back."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, EngineSleepingError):
            return APIError(503, "The model is asleep; POST /wakeup to serve requests again.")
        if isinstance(exc, ValueError):
            return APIError(400, str(exc) or "invalid request")
        if isinstance(exc, RuntimeError) and (
            "not running" in str(exc) or not self.engine.is_healthy()
        ):
            return APIError(503, "The engine is not running.")
        log_internal_error(exc, request_id)
        return APIError(500, f"Internal server error (request {request_id}).")


def log_internal_error(exc: BaseException, request_id: str) -> None:
    """Log where a fault happened, with the request id only: frames, not the message,
    which might quote user content."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("request %s: internal error %s\n%s", request_id, type(exc).__name__, frames)
