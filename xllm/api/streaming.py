"""Plumbing of the generating endpoints: merged engine streams, SSE chunks, disconnects."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from xllm.api.metrics import RequestTimer
from xllm.engine.outputs import RequestOutput
from xllm.engine.protocol import OutputStream

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChunkWriter:
    """Builds `data: {...}` events that share id, object, created and model.

    The shared head is serialized once; each chunk only dumps its small choice dict.
    """

    def __init__(
        self, request_id: str, obj: str, created: int, model: str, include_usage: bool
    ) -> None:
        head = dumps({"id": request_id, "object": obj, "created": created, "model": model})
        self._head = "data: " + head[:-1] + ',"choices":['
        self._tail = "],\"usage\":null}\n\n" if include_usage else "]}\n\n"
        self._usage_head = "data: " + head[:-1] + ',"choices":[],"usage":'

    def choice(self, choice: dict) -> str:
        return self._head + dumps(choice) + self._tail

    def usage(self, usage: dict) -> str:
        return self._usage_head + dumps(usage) + "}\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _close(gen) -> None:
    with anyio.CancelScope(shield=True):
        await gen.aclose()


async def merged_outputs(
    streams: Sequence[OutputStream], timer: RequestTimer
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) pairs of the engine streams, as they come; `timer` sees
    each output's arrival. An engine error of any stream is raised here."""
    if len(streams) == 1:
        async for out in streams[0]:
            timer.output(0)
            yield 0, out
        return

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: OutputStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
        except Exception as exc:  # handed to the consumer
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
                continue
            timer.output(i)
            yield i, out
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work):
    """Await the coroutine `work` unless the client goes away first; then cancel it
    (aborting its engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        await _cancel(task)
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    await _cancel(task)
    raise ClientDisconnected()


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait((task,))


class EventStream(StreamingResponse):
    """An SSE response that always runs `on_close` once the stream is over, however it ends
    (finished, client gone, or never started), and closes its body iterator."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await _close(self.body_iterator)
            finally:
                self._on_close()
