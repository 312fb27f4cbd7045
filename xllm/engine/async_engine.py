"""The async front: the engine runs in its own thread; each request gets an async stream.

Requests and aborts reach the engine thread through a queue; each step's
outputs come back to the event loop in one call. A consumer that stops
iterating (client gone, cancelled) aborts its request, which frees its blocks
on the engine's next turn.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from xllm.config import EngineConfig
from xllm.engine.llm_engine import LLMEngine
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineSleepingError(RuntimeError):
    """A request reached an engine that is asleep."""


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_path = str(self.engine.model_path)
        self.default_params = self.engine.default_params
        self.dead_reason: str | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sleeping = False
        self._sleep_lock = asyncio.Lock()
        self._stats = self.engine.stats()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.dead_reason is None:
            self.dead_reason = "the engine is shut down"

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def is_sleeping(self) -> bool:
        """True from the moment sleep() is called until wake_up() has finished."""
        return self._sleeping

    def stats(self) -> dict[str, int]:
        """Counts as of the engine's last step (running, waiting, free and total blocks,
        prefix-cache queries and hits, sleep level)."""
        return dict(self._stats)

    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (and with level 2 the weights) on the engine thread, between
        steps. New requests are refused from the moment this is called. ValueError if a
        request is in flight."""
        async with self._sleep_lock:
            was_sleeping = self._sleeping
            self._sleeping = True
            try:
                await self._call(self.engine.sleep, level)
            except BaseException:
                self._sleeping = was_sleeping and self.engine.sleep_level > 0
                raise

    async def wake_up(self) -> None:
        """Reload what sleep() freed; requests are taken again once it is done."""
        async with self._sleep_lock:
            await self._call(self.engine.wake_up)
            self._sleeping = False

    async def _call(self, fn, *args):
        """Run fn(*args) on the engine thread, in turn with steps and requests."""
        if not self.is_healthy():
            raise RuntimeError("engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(("call", fn, args, loop, future))
        return await future

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; stopping early aborts it."""
        if not self.is_healthy():
            raise RuntimeError("engine is not running")
        if self._sleeping:
            raise EngineSleepingError("the model is asleep")
        self.engine.check_request(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id} is already in use")
        self._loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._drain_inbox()
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as error:  # a fault of the server: fail what is in flight
                logger.exception("engine step failed; aborting %d requests", len(engine.requests))
                self._fail_all(error)
                continue
            self._stats = engine.stats()
            if outputs:
                self._deliver(outputs)
            logger.debug("step: %d outputs in %.1f ms", len(outputs),
                         1e3 * (time.perf_counter() - started))
        self._fail_all(RuntimeError("engine is not running"))
        self._drain_inbox(stopped=True)

    def _drain_inbox(self, stopped: bool = False) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "call":
                self._run_call(*message[1:], stopped=stopped)
            elif stopped:
                continue
            elif message[0] == "add":
                _, request_id, prompt_ids, params = message
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except ValueError as error:
                    self._deliver_error(request_id, error)
            else:
                self.engine.abort_request(message[1])

    def _run_call(self, fn, args: tuple, loop: asyncio.AbstractEventLoop,
                  future: asyncio.Future, stopped: bool = False) -> None:
        error: BaseException | None = RuntimeError("engine is not running") if stopped else None
        result = None
        if error is None:
            try:
                result = fn(*args)
            except Exception as exc:  # handed to the caller
                error = exc
            self._stats = self.engine.stats()

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver_error(request_id, RuntimeError(f"internal error: {error}"))
        self._stats = self.engine.stats()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        def push() -> None:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)

        self._loop.call_soon_threadsafe(push)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        def push() -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(error)

        if self._loop is not None:
            self._loop.call_soon_threadsafe(push)
