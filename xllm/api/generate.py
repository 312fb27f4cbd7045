"""The one path of every generating endpoint, from request to response or SSE stream.

An endpoint turns its request into a `Generation` (prompts, sampling
parameters, and a `Renderer`: the small per-endpoint part that says how the
engine's outputs look in its response and its chunks). `serve_generation`
does the rest, the same way for all: timer, model check, readiness, the
in-flight limit, the engine requests, streaming or collecting until the
client leaves (499), engine errors, and releasing everything at the end.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xllm.api import guards
from xllm.api.context import ServingContext, api_error
from xllm.api.errors import error_event
from xllm.api.metrics import CLIENT_CLOSED, RequestTimer, request_timer
from xllm.api.protocol import GenerationRequest
from xllm.api.streaming import (
    DONE,
    ChunkWriter,
    ClientDisconnected,
    EventStream,
    merged_outputs,
    until_disconnect,
    usage_dict,
)
from xllm.engine.outputs import RequestOutput, TokenLogprob
from xllm.engine.protocol import OutputStream
from xllm.engine.sampling_params import SamplingParams
from xllm.inputs import PromptInput

logger = logging.getLogger("xllm.api")


@dataclass
class Choice:
    """One choice of the response (prompt-major: index = prompt_index * n + choice),
    as accumulated so far."""

    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    started: bool = False


@dataclass
class ChoiceNews:
    """What one engine output brought one choice; `first` marks the choice's first news."""

    choice: Choice
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    first: bool


class Renderer:
    """The per-endpoint part: the response's and the chunks' shape."""

    object: ClassVar[str]  # the response's `object`
    chunk_object: ClassVar[str]  # each SSE chunk's `object`
    id_prefix: ClassVar[str]

    def opening(self, num_choices: int) -> list[dict]:
        """Chunk choices sent before any engine output."""
        return []

    def chunk(self, news: ChoiceNews) -> dict | None:
        """A chunk's choice for this news, or None to send nothing."""
        raise NotImplementedError

    def choice(self, choice: Choice) -> dict:
        """A collected response's choice."""
        raise NotImplementedError

    def choices(self, choices: list[Choice]) -> list[dict]:
        """A collected response's choices."""
        return [self.choice(c) for c in choices]

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return usage_dict(prompt_tokens, completion_tokens)


@dataclass
class Generation:
    """What an endpoint asks of the engine, and how to answer. `param_names` renames the
    engine's fields to the request's own in error messages."""

    kind: str  # for the log: "chat", "completion"
    prompts: list[PromptInput]
    params: SamplingParams
    renderer: Renderer
    param_names: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None  # an id the request body chose (/v1/sample's request_id)
    summary: str | None = None  # what the log says of the request, instead of the default

    @property
    def num_seqs(self) -> int:
        """Sequences this generation runs: what it counts against the in-flight limit."""
        return len(self.prompts) * self.params.num_choices


Req = TypeVar("Req", bound=GenerationRequest)


async def serve_generation(
    ctx: ServingContext,
    request: Request,
    req: Req,
    prepare: Callable[[ServingContext, Req], Awaitable[Generation]],
) -> Response:
    """Serve a generating request; `prepare` is the endpoint's request -> Generation."""
    timer = request_timer(request.scope, ctx.metrics)
    ctx.check_model(req.model)
    gen = await prepare(ctx, req)
    request_id = gen.request_id or guards.request_id(request.scope, gen.renderer.id_prefix)
    chosen = gen.request_id is not None or guards.header_request_id(request.scope) is not None
    ctx.acquire(gen.num_seqs)
    try:
        streams = _add_requests(ctx, _engine_id(request_id, chosen), gen)
    except Exception as exc:
        ctx.release(gen.num_seqs)
        raise api_error(exc, request_id, gen.param_names) from None
    prompt_tokens = sum(len(p) for p in gen.prompts)
    if gen.summary is not None:
        logger.info("%s: %s", request_id, gen.summary)
    else:
        logger.info("%s: %s, %d prompt(s) of %s tokens, %d choice(s), max_tokens=%s, "
                    "stream=%s", request_id, gen.kind, len(gen.prompts),
                    ",".join(str(len(p)) for p in gen.prompts), gen.params.num_choices,
                    gen.params.max_tokens, bool(req.stream))
    job = _Job(ctx, request_id, gen, streams, prompt_tokens, timer)
    headers = {"X-Request-Id": request_id}
    if req.stream:
        return EventStream(job.events(req.include_usage), on_close=job.close, headers=headers)
    try:
        body = await until_disconnect(request, job.collect())
    except ClientDisconnected:
        logger.info("%s: client disconnected, aborted", request_id)
        return Response(status_code=CLIENT_CLOSED)
    except Exception as exc:
        err = api_error(exc, request_id)
        logger.info("%s: failed (%s)", request_id, err.body()["error"]["code"])
        raise err from None
    finally:
        job.close()
    return JSONResponse(body, headers=headers)


def _engine_id(request_id: str, chosen: bool) -> str:
    """The engine's id of a request: its own id, made unique when the client `chosen` it
    (a client may send the same id twice)."""
    return f"{request_id}/{uuid.uuid4().hex[:8]}" if chosen else request_id


def _add_requests(ctx: ServingContext, request_id: str, gen: Generation) -> list[OutputStream]:
    """One engine request per prompt; if one is refused, none stays queued."""
    ids = [request_id] if len(gen.prompts) == 1 else \
        [f"{request_id}-{i}" for i in range(len(gen.prompts))]
    streams: list[OutputStream] = []
    try:
        for rid, prompt in zip(ids, gen.prompts):
            streams.append(ctx.engine.add_request(rid, prompt, gen.params))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


class _Job:
    """One generating request in flight: its engine streams, its choices and its clock."""

    def __init__(self, ctx: ServingContext, request_id: str, gen: Generation,
                 streams: list[OutputStream], prompt_tokens: int, timer: RequestTimer) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.gen = gen
        self.streams = streams
        self.prompt_tokens = prompt_tokens
        self.timer = timer
        self.created = int(time.time())
        self.start = time.perf_counter()
        n = gen.params.num_choices
        self.choices = [Choice(i, i // n) for i in range(len(gen.prompts) * n)]
        self.prompt_logprobs: dict[int, list] = {}
        self.completion_tokens = 0
        self._closed = False
        self._ended = False  # served to the end (`_done`)

    def close(self) -> None:
        """Abort what is still running and leave the in-flight count; once. A request that
        did not get to its end still counts its tokens."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self.timer.count_tokens(self.prompt_tokens, self.completion_tokens)
        for stream in self.streams:
            stream.close()
        self.ctx.release(self.gen.num_seqs)

    def _news(self, prompt_index: int, out: RequestOutput) -> list[ChoiceNews]:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        news = []
        for c in out.outputs:
            choice = self.choices[prompt_index * self.gen.params.num_choices + c.index]
            first = not choice.started
            if first:
                choice.started = True
                choice.prompt_logprobs = self.prompt_logprobs.get(prompt_index)
            self.completion_tokens += len(c.token_ids)
            choice.text.append(c.text)
            if c.logprobs:
                choice.logprobs.extend(c.logprobs)
            if c.finish_reason is not None:
                choice.finish_reason = c.finish_reason
            news.append(ChoiceNews(choice, c.text, c.logprobs, c.finish_reason, first))
        return news

    def _done(self, first_token_at: float | None = None) -> None:
        self._ended = True
        self.timer.finish(self.prompt_tokens, self.completion_tokens)
        elapsed = time.perf_counter() - self.start
        if first_token_at is None:
            logger.info("%s: done, %d completion tokens in %.3fs", self.request_id,
                        self.completion_tokens, elapsed)
        else:
            logger.info("%s: done, %d completion tokens in %.3fs (first token %.3fs)",
                        self.request_id, self.completion_tokens, elapsed,
                        first_token_at - self.start)

    async def collect(self) -> dict:
        async with aclosing(merged_outputs(self.streams, self.timer)) as outs:
            async for prompt_index, out in outs:
                self._news(prompt_index, out)
        self._done()
        renderer = self.gen.renderer
        return {
            "id": self.request_id,
            "object": renderer.object,
            "created": self.created,
            "model": self.ctx.model_name,
            "choices": renderer.choices(self.choices),
            "usage": renderer.usage(self.prompt_tokens, self.completion_tokens),
        }

    async def events(self, include_usage: bool):
        renderer = self.gen.renderer
        writer = ChunkWriter(self.request_id, renderer.chunk_object, self.created,
                             self.ctx.model_name, include_usage)
        first_token_at = None
        try:
            for choice in renderer.opening(len(self.choices)):
                yield writer.choice(choice)
            async with aclosing(merged_outputs(self.streams, self.timer)) as outs:
                async for prompt_index, out in outs:
                    for news in self._news(prompt_index, out):
                        chunk = renderer.chunk(news)
                        if chunk is None:
                            continue
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield writer.choice(chunk)
            self._done(first_token_at or time.perf_counter())
            if include_usage:
                yield writer.usage(usage_dict(self.prompt_tokens, self.completion_tokens))
        except (GeneratorExit, asyncio.CancelledError):  # the client left mid-stream
            self.timer.disconnected = True
            raise
        except Exception as exc:
            self.timer.failed = True
            err = api_error(exc, self.request_id)
            logger.info("%s: failed in stream (%s)", self.request_id, err.body()["error"]["code"])
            yield error_event(err)
        yield DONE
