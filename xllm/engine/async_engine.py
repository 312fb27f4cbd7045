"""The async front: the engine runs in its own thread; each request gets an async stream.

Text becomes checked prompts here (the processor, in a worker thread of its own, so that
no prompt holds up the event loop: /health and every other stream); requests,
aborts, sleep and wake-up reach the engine thread as typed messages through one
queue, and each step's outputs come back to the event loop in one call. A stream
closed before its request finished (client gone, cancelled) aborts the request,
which frees its blocks on the engine's next turn. If the engine thread ends, for
whatever reason, every open stream gets an EngineDeadError.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xllm.config import EngineConfig
from xllm.engine.errors import (
    EngineDeadError,
    EngineSleepingError,
    InvalidParameter,
    RequestFailedError,
)
from xllm.engine.llm_engine import LLMEngine
from xllm.engine.multimodal import VisionSpec
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput

logger = logging.getLogger(__name__)

IMAGE_WORKERS = 2  # threads decoding and resizing images (Pillow lets go of the GIL)


@dataclass
class AddRequest:
    request_id: str
    prompt: PromptInput
    params: SamplingParams


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Call:
    """Run `fn()` on the engine thread, in turn with steps, and settle `future` with it."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(done)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass


Message = AddRequest | AbortRequest | Call


class RequestStream:
    """The outputs of one request, as an async iterator; `close()` before the end aborts it."""

    def __init__(self, engine: "AsyncEngine", request_id: str) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            self._engine.forget(self.request_id)
            raise item
        if item.finished:
            self.finished = True
            self._engine.forget(self.request_id)
        return item

    def close(self) -> None:
        """Stop listening; abort the request if it is still running."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self._go = threading.Event()  # start() or shutdown() lets the built engine thread on
        self._stopping = False
        self.engine = self._build(config)
        self.processor = self.engine.processor
        self.max_model_len = self.engine.max_model_len
        self.default_params = self.engine.default_params
        self._dead_reason: str | None = None
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._sleeping = False
        self._sleep_lock = asyncio.Lock()
        self._stats = self.engine.stats()
        # One worker: the Hugging Face tokenizer is not meant to be shared between threads.
        self._text_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xllm-text")
        self._image_workers = ThreadPoolExecutor(max_workers=IMAGE_WORKERS,
                                                 thread_name_prefix="xllm-image")

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer

    def _build(self, config: EngineConfig) -> LLMEngine:
        """The engine, built on the thread that will run its steps (which then waits for
        start()). OpenMP gives each thread that starts parallel regions a worker pool of its
        own; two pools on a machine that one pool fills make libgomp throttle its spinning,
        and every kernel then waits on futex wake-ups (decode steps ~40% slower)."""
        built: list[LLMEngine | BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                built.append(LLMEngine(config))
            except BaseException as exc:  # handed to the constructor's caller
                built.append(exc)
                return
            finally:
                ready.set()
            self._go.wait()
            self._run()

        self._thread = threading.Thread(target=run, name="xllm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(built[0], BaseException):
            self._thread.join()
            raise built[0]
        return built[0]

    def start(self) -> None:
        self._started = True
        self._go.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._go.set()
        if self._started:
            self._thread.join(timeout=10)
        if self._dead_reason is None:
            self._dead_reason = "the engine is shut down"
        self._text_worker.shutdown(wait=False, cancel_futures=True)
        self._image_workers.shutdown(wait=False, cancel_futures=True)

    def is_healthy(self) -> bool:
        return self._started and self._thread.is_alive() and not self._stopping

    @property
    def dead_reason(self) -> str | None:
        """Why the engine is not running, once it is not."""
        if self._dead_reason is None and not self.is_healthy():
            return "the engine is not running"
        return self._dead_reason

    @property
    def is_sleeping(self) -> bool:
        """True from the moment sleep() is called until wake_up() has finished."""
        return self._sleeping

    def stats(self) -> dict[str, int]:
        """Counts as of the engine's last step (running, waiting, free and total blocks,
        prefix-cache queries and hits, sleep level)."""
        return dict(self._stats)

    @property
    def vision(self) -> VisionSpec | None:
        """The vision model's spec; None for a text-only model."""
        return self.processor.vision

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool,
                          images: list[bytes] = ()) -> PromptInput:
        """The prompt of a conversation under the model's chat template; `images` are the
        files of its image parts, in order (decoded side by side in the image workers)."""
        processed = []
        if images:
            self.vision.check_count(len(images))
            loop = asyncio.get_running_loop()
            processed = await asyncio.gather(*(
                loop.run_in_executor(self._image_workers, self.vision.process, data, i)
                for i, data in enumerate(images)))
        return await self._off_loop(self.processor.chat, messages, add_generation_prompt,
                                    processed)

    async def text_prompt(self, text: str) -> PromptInput:
        return await self._off_loop(self.processor.text, text)

    async def pieces_prompt(self, pieces: list[str]) -> tuple[PromptInput, list[int]]:
        """The prompt of texts tokenized one by one, and where each piece starts."""
        return await self._off_loop(self.processor.pieces, pieces)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._check_running()
        return await asyncio.get_running_loop().run_in_executor(self._text_worker, fn, *args)

    def add_request(
        self, request_id: str, prompt: PromptInput, params: SamplingParams
    ) -> RequestStream:
        """Check and queue a request; its outputs come through the returned stream.

        Raises InvalidParameter, EngineSleepingError or EngineDeadError, queueing nothing.
        """
        self._check_running()
        if self._sleeping:
            raise EngineSleepingError("the model is asleep")
        self.processor.check(prompt, params)
        if request_id in self._streams:
            raise InvalidParameter("request_id", f"request id {request_id} is already in use")
        self._loop = asyncio.get_running_loop()
        stream = self._streams[request_id] = RequestStream(self, request_id)
        self._send(AddRequest(request_id, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        self.forget(request_id)
        self._send(AbortRequest(request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (and with level 2 the weights) on the engine thread, between
        steps. New requests are refused from the moment this is called. EngineBusyError
        if a request is in flight."""
        async with self._sleep_lock:
            was_sleeping = self._sleeping
            self._sleeping = True
            try:
                await self._call(lambda: self.engine.sleep(level))
            except BaseException:
                self._sleeping = was_sleeping and self.engine.sleep_level > 0
                raise

    async def wake_up(self) -> None:
        """Reload what sleep() freed; requests are taken again once it is done."""
        async with self._sleep_lock:
            await self._call(self.engine.wake_up)
            self._sleeping = False

    async def _call(self, fn: Callable[[], Any]) -> Any:
        self._check_running()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(Call(fn, loop, future))
        return await future

    def _check_running(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(self.dead_reason or "the engine is not running")

    def _send(self, message: Message) -> None:
        self._inbox.put(message)
        self._wake.set()

    # --- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop_steps()
        except BaseException as exc:  # the thread ends here; every stream is told below
            logger.exception("the engine thread died")
            self._dead_reason = f"the engine thread died ({type(exc).__name__})"
        finally:
            self._stopping = True
            self._drain_inbox(stopped=True)
            self._fail_all(EngineDeadError(self._dead_reason or "the engine is shut down"),
                           every_stream=True)

    def _loop_steps(self) -> None:
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
            except Exception as error:  # outside any one request's share: fail them all
                logger.exception("engine step failed; aborting %d requests", len(engine.requests))
                self._fail_all(_failed(error))
                continue
            self._stats = engine.stats()
            if outputs:
                self._deliver(outputs)
            logger.debug("step: %d outputs in %.1f ms", len(outputs),
                         1e3 * (time.perf_counter() - started))

    def _drain_inbox(self, stopped: bool = False) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Call):
                self._run_call(message, stopped)
            elif stopped:
                continue
            elif isinstance(message, AddRequest):
                self.engine.add_request(message.request_id, message.prompt, message.params)
            else:
                self.engine.abort_request(message.request_id)

    def _run_call(self, call: Call, stopped: bool) -> None:
        if stopped:
            call.settle(error=EngineDeadError("the engine is not running"))
            return
        try:
            result = call.fn()
        except Exception as exc:  # handed to the caller
            call.settle(error=exc)
        else:
            call.settle(result)
        self._stats = self.engine.stats()

    def _fail_all(self, error: BaseException, every_stream: bool = False) -> None:
        """Abort every request in the engine and hand `error` to their streams (with
        `every_stream`, to every open stream, queued requests included)."""
        request_ids = list(self.engine.requests)
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        self._stats = self.engine.stats()
        self._fail(None if every_stream else request_ids, error)

    def _fail(self, request_ids: list[str] | None, error: BaseException) -> None:
        """Hand `error` to the streams of `request_ids` (None: all open streams)."""

        def push() -> None:
            for request_id in list(self._streams) if request_ids is None else request_ids:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(error)

        self._on_loop(push)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        def push() -> None:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out if out.error is None else _failed(out.error))

        self._on_loop(push)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass


def _failed(cause: BaseException) -> RequestFailedError:
    """What a request's stream gets when the engine failed while serving it."""
    failed = RequestFailedError("the engine failed while serving this request")
    failed.__cause__ = cause
    return failed
