"""POST /v1/completions: prompt(s) -> engine -> text completion or SSE (prompt-major choices)."""

import logging
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xllm.api.context import ServingContext
from xllm.api.errors import error_event, invalid
from xllm.api.logprobs import CompletionLogprobs
from xllm.api.metrics import RequestTimer, request_timer
from xllm.api.params import build_sampling_params, check_beam_fields, check_prompt_length
from xllm.api.protocol import CompletionRequest
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
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams

logger = logging.getLogger("xllm.api")

DEFAULT_MAX_TOKENS = 16  # as in OpenAI's completions API


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # the text as sent; None for token ids (decoded only for echo)


def split_prompts(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def encode_prompts(ctx: ServingContext, prompt: str | list) -> list[Prompt]:
    tokenizer = ctx.engine.tokenizer
    vocab_size = tokenizer.vocab_size
    prompts = []
    for item in split_prompts(prompt):
        if isinstance(item, str):
            prompts.append(Prompt(tokenizer.encode(item, add_special_tokens=True), item))
            continue
        for token_id in item:
            if not 0 <= token_id < vocab_size:
                raise invalid(f"prompt token id {token_id} is out of range [0, {vocab_size})",
                              "prompt")
        prompts.append(Prompt(list(item), None))
    return prompts


def echo_text(ctx: ServingContext, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return ctx.engine.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)


async def create_completion(ctx: ServingContext, req: CompletionRequest,
                            request: Request) -> Response:
    timer = request_timer(request.scope, ctx.metrics)
    ctx.check_model(req.model)
    check_beam_fields(req)
    prompts = encode_prompts(ctx, req.prompt)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    echo = bool(req.echo)
    params = build_sampling_params(
        req, max_tokens=max_tokens, logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None,
        defaults=ctx.engine.default_params, vocab_size=ctx.engine.tokenizer.vocab_size,
    )
    for prompt in prompts:
        check_prompt_length(len(prompt.token_ids), max_tokens, ctx.engine.max_model_len)
    ctx.check_ready()
    ctx.acquire()
    request_id = new_request_id("cmpl")
    created = int(time.time())
    headers = {"X-Request-Id": request_id}
    logger.info("%s: completion, %d prompt(s) of %s tokens, n=%d, max_tokens=%s, stream=%s",
                request_id, len(prompts), ",".join(str(len(p.token_ids)) for p in prompts),
                params.n, params.max_tokens, bool(req.stream))
    run = _Run(ctx, request_id, created, prompts, params, echo, timer)
    if req.stream:
        return EventStream(run.stream(req.include_usage), on_close=ctx.release, headers=headers)
    try:
        result = await until_disconnect(request, run.collect())
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


class _Run:
    """One completions request: its engine streams and the per-choice bookkeeping."""

    def __init__(self, ctx: ServingContext, request_id: str, created: int,
                 prompts: list[Prompt], params: SamplingParams, echo: bool,
                 timer: RequestTimer) -> None:
        self.ctx = ctx
        self.timer = timer
        self.request_id = request_id
        self.created = created
        self.prompts = prompts
        self.params = params
        self.echo = echo
        self.want_logprobs = params.logprobs is not None
        self.completion_tokens = 0
        self.prompt_logprobs: dict[int, list] = {}
        self.logprobs: dict[int, CompletionLogprobs] = {}
        self.started: set[int] = set()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    def _outputs(self):
        return engine_outputs(self.ctx.engine, [p.token_ids for p in self.prompts], self.params,
                              self.request_id, self.timer)

    def _choice_news(self, prompt_index: int, out: RequestOutput):
        """(choice index, text, logprobs dict or None, finish_reason) for each choice with news;
        the first news of a choice carries the echoed prompt (and its logprobs)."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        tokenizer = self.ctx.engine.tokenizer
        for c in out.outputs:
            index = prompt_index * self.params.n + c.index
            self.completion_tokens += len(c.token_ids)
            text = c.text
            lp = None
            if index not in self.started:
                self.started.add(index)
                prompt = self.prompts[prompt_index]
                if self.echo:
                    text = echo_text(self.ctx, prompt) + text
                if self.want_logprobs:
                    lp = self.logprobs[index] = CompletionLogprobs(tokenizer)
                    if self.echo and prompt_index in self.prompt_logprobs:
                        lp.add(self.prompt_logprobs[prompt_index], prompt.token_ids)
            elif self.want_logprobs:
                lp = self.logprobs[index]
            if lp is not None and c.logprobs:
                lp.add(c.logprobs)
            yield index, text, lp, c.finish_reason

    async def collect(self) -> dict:
        start = time.perf_counter()
        total = len(self.prompts) * self.params.n
        texts: list[list[str]] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        async with aclosing(self._outputs()) as outs:
            async for prompt_index, out in outs:
                for index, text, _, finish_reason in self._choice_news(prompt_index, out):
                    texts[index].append(text)
                    if finish_reason is not None:
                        finish[index] = finish_reason
        self.timer.finish(self.prompt_tokens, self.completion_tokens)
        choices = []
        for index in range(total):
            lp = self.logprobs.get(index)
            if self.want_logprobs and lp is None:
                lp = CompletionLogprobs(self.ctx.engine.tokenizer)
            choices.append({
                "index": index,
                "text": "".join(texts[index]),
                "logprobs": lp.to_dict() if lp is not None else None,
                "finish_reason": finish[index],
            })
        logger.info("%s: done, %d completion tokens in %.3fs", self.request_id,
                    self.completion_tokens, time.perf_counter() - start)
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.ctx.model_name,
            "choices": choices,
            "usage": usage_dict(self.prompt_tokens, self.completion_tokens),
        }

    async def stream(self, include_usage: bool):
        start = time.perf_counter()
        writer = ChunkWriter(self.request_id, "text_completion", self.created,
                             self.ctx.model_name, include_usage)
        first_token_at = None
        try:
            async with aclosing(self._outputs()) as outs:
                async for prompt_index, out in outs:
                    for index, text, lp, finish_reason in self._choice_news(prompt_index, out):
                        has_logprobs = lp is not None and bool(lp.tokens)
                        if not text and finish_reason is None and not has_logprobs:
                            continue
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield writer.choice({
                            "index": index,
                            "text": text,
                            "logprobs": lp.take() if lp is not None else None,
                            "finish_reason": finish_reason,
                        })
            self.timer.finish(self.prompt_tokens, self.completion_tokens)
            if include_usage:
                yield writer.usage(usage_dict(self.prompt_tokens, self.completion_tokens))
            elapsed = time.perf_counter() - start
            ttft = (first_token_at - start) if first_token_at is not None else elapsed
            logger.info("%s: done, %d completion tokens in %.3fs (first token %.3fs)",
                        self.request_id, self.completion_tokens, elapsed, ttft)
        except Exception as exc:
            self.timer.failed = True
            err = self.ctx.engine_error(exc, self.request_id)
            logger.info("%s: failed in stream (%s)", self.request_id, err.body()["error"]["code"])
            yield error_event(err)
        yield DONE
