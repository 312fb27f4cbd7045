"""POST /v1/chat/completions: messages -> chat template -> engine -> chat completion or SSE."""

import logging
import time
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xllm.api.context import ServingContext
from xllm.api.errors import error_event, invalid
from xllm.api.logprobs import chat_logprobs
from xllm.api.metrics import RequestTimer, request_timer
from xllm.api.params import (
    MAX_LOGPROBS,
    build_sampling_params,
    check_beam_fields,
    check_prompt_length,
)
from xllm.api.protocol import ChatCompletionRequest, ChatMessage
from xllm.api.streaming import (
    DONE,
    ChunkWriter,
    ClientDisconnected,
    EventStream,
    engine_outputs,
    new_request_id,
    until_disconnect,
    usage_dict,
)
from xllm.engine.sampling_params import SamplingParams

logger = logging.getLogger("xllm.api")

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def message_text(content: str | list[dict] | None, where: str) -> str:
    """A message's content as one string; text parts are joined, images are refused
    (this is a text-only model)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.content[{i}].text must be a string", "messages")
            texts.append(text)
        elif kind in ("image_url", "image", "input_image"):
            raise invalid("image input is not supported: this model is text-only", "messages")
        else:
            raise invalid(f"{where}.content[{i}]: unsupported content part type {kind!r}",
                          "messages")
    return "".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise invalid("messages must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise invalid(f"messages[{i}].role {message.role!r} is not one of "
                          f"{sorted(ROLES)}", "messages")
        out.append({"role": message.role, "content": message_text(message.content,
                                                                    f"messages[{i}]")})
    return out


def chat_prompt_ids(ctx: ServingContext, req: ChatCompletionRequest) -> list[int]:
    tokenizer = ctx.engine.tokenizer
    messages = template_messages(req.messages)
    add_generation_prompt = req.add_generation_prompt is not False
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template's own raise_exception(), e.g. roles out of order
        raise invalid(f"the chat template rejected the messages: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_params(ctx: ServingContext, req: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise invalid(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(
        req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None,
        defaults=ctx.engine.default_params, vocab_size=ctx.engine.tokenizer.vocab_size,
    )
    check_prompt_length(prompt_len, max_tokens, ctx.engine.max_model_len)
    return params


async def create_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest, request: Request
) -> Response:
    timer = request_timer(request.scope, ctx.metrics)
    ctx.check_model(req.model)
    check_beam_fields(req)
    prompt_ids = chat_prompt_ids(ctx, req)
    params = chat_params(ctx, req, len(prompt_ids))
    ctx.check_ready()
    ctx.acquire()
    request_id = new_request_id("chatcmpl")
    created = int(time.time())
    headers = {"X-Request-Id": request_id}
    logger.info("%s: chat, %d prompt tokens, n=%d, max_tokens=%s, stream=%s", request_id,
                len(prompt_ids), params.n, params.max_tokens, bool(req.stream))
    if req.stream:
        body = _stream(ctx, request_id, created, prompt_ids, params, req.include_usage, timer)
        return EventStream(body, on_close=ctx.release, headers=headers)
    try:
        result = await until_disconnect(
            request, _collect(ctx, request_id, created, prompt_ids, params, timer))
    except ClientDisconnected:
        logger.info("%s: client disconnected, aborted", request_id)
        return Response(status_code=499)
    except Exception as exc:
        err = ctx.engine_error(exc, request_id)
        logger.info("%s: failed (%s)", request_id, err.body()["error"]["code"])
        raise err from None
    finally:
        ctx.release()
    return JSONResponse(result, headers=headers)


async def _collect(ctx: ServingContext, request_id: str, created: int, prompt_ids: list[int],
                   params: SamplingParams, timer: RequestTimer) -> dict:
    start = time.perf_counter()
    n = params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion_tokens = 0
    outputs = engine_outputs(ctx.engine, [prompt_ids], params, request_id, timer)
    async with aclosing(outputs) as outs:
        async for _, out in outs:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                texts[c.index].append(c.text)
                if c.logprobs:
                    logprobs[c.index].extend(c.logprobs)
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
    timer.finish(len(prompt_ids), completion_tokens)
    tokenizer = ctx.engine.tokenizer
    want_logprobs = params.logprobs is not None
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "".join(texts[i])},
            "logprobs": {"content": chat_logprobs(tokenizer, logprobs[i])}
            if want_logprobs else None,
            "finish_reason": finish[i],
        }
        for i in range(n)
    ]
    logger.info("%s: done, %d completion tokens in %.3fs", request_id, completion_tokens,
                time.perf_counter() - start)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage_dict(len(prompt_ids), completion_tokens),
    }


async def _stream(ctx: ServingContext, request_id: str, created: int, prompt_ids: list[int],
                  params: SamplingParams, include_usage: bool, timer: RequestTimer):
    start = time.perf_counter()
    writer = ChunkWriter(request_id, "chat.completion.chunk", created, ctx.model_name,
                         include_usage)
    tokenizer = ctx.engine.tokenizer
    want_logprobs = params.logprobs is not None
    completion_tokens = 0
    first_token_at = None
    try:
        for i in range(params.n):
            yield writer.choice({"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})
        outputs = engine_outputs(ctx.engine, [prompt_ids], params, request_id, timer)
        async with aclosing(outputs) as outs:
            async for _, out in outs:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    has_logprobs = want_logprobs and bool(c.logprobs)
                    if not c.text and c.finish_reason is None and not has_logprobs:
                        continue
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    yield writer.choice({
                        "index": c.index,
                        "delta": {"content": c.text} if c.text else {},
                        "logprobs": {"content": chat_logprobs(tokenizer, c.logprobs)}
                        if has_logprobs else None,
                        "finish_reason": c.finish_reason,
                    })
        timer.finish(len(prompt_ids), completion_tokens)
        if include_usage:
            yield writer.usage(usage_dict(len(prompt_ids), completion_tokens))
        elapsed = time.perf_counter() - start
        ttft = (first_token_at - start) if first_token_at is not None else elapsed
        logger.info("%s: done, %d completion tokens in %.3fs (first token %.3fs)", request_id,
                    completion_tokens, elapsed, ttft)
    except Exception as exc:
        timer.failed = True
        err = ctx.engine_error(exc, request_id)
        logger.info("%s: failed in stream (%s)", request_id, err.body()["error"]["code"])
        yield error_event(err)
    yield DONE
