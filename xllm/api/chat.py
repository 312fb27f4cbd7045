"""POST /v1/chat/completions: messages -> Generation; the chat response and chunk shapes."""

import asyncio

from xllm.api.context import ServingContext
from xllm.api.errors import invalid
from xllm.api.generate import Choice, ChoiceNews, Generation, Renderer
from xllm.api.logprobs import chat_logprobs
from xllm.api.media import load_image_bytes
from xllm.api.params import (
    build_sampling_params,
    check_max_tokens,
    check_unserved,
)
from xllm.api.protocol import ChatCompletionRequest, ChatMessage
from xllm.engine.tokenizer import Tokenizer

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


IMAGE_PARTS = ("image_url", "image", "input_image")


def message_content(content: str | list[dict] | None, where: str, urls: list[str] | None
                    ) -> str | list[dict]:
    """A message's content for the chat template: one string, or for a vision model
    (`urls` given) text parts and {"type": "image"} parts, whose URLs go to `urls`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.content[{i}].text must be a string", "messages")
            parts.append({"type": "text", "text": text})
        elif kind in IMAGE_PARTS:
            if urls is None:
                raise invalid("image input is not supported: this model is text-only",
                              "messages")
            urls.append(image_url(part, f"{where}.content[{i}]"))
            parts.append({"type": "image"})
        else:
            raise invalid(f"{where}.content[{i}]: unsupported content part type {kind!r}",
                          "messages")
    if urls is None or not any(part["type"] == "image" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def image_url(part: dict, where: str) -> str:
    """The URL of an image part: {"image_url": {"url"}} (OpenAI), or a plain string."""
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.{part['type']}.url must be a non-empty string", "messages")
    return url


def template_messages(messages: list[ChatMessage], urls: list[str] | None = None
                      ) -> list[dict]:
    """The messages as the chat template takes them; a vision model's image URLs are
    collected in `urls` (None: a text-only model, which refuses images)."""
    if not messages:
        raise invalid("messages must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise invalid(f"messages[{i}].role {message.role!r} is not one of "
                          f"{sorted(ROLES)}", "messages")
        out.append({"role": message.role,
                    "content": message_content(message.content, f"messages[{i}]", urls)})
    return out


class ChatRenderer(Renderer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, tokenizer: Tokenizer, want_logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.want_logprobs = want_logprobs

    def opening(self, num_choices: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(num_choices)]

    def chunk(self, news: ChoiceNews) -> dict | None:
        has_logprobs = self.want_logprobs and bool(news.logprobs)
        if not news.text and news.finish_reason is None and not has_logprobs:
            return None
        return {
            "index": news.choice.index,
            "delta": {"content": news.text} if news.text else {},
            "logprobs": {"content": chat_logprobs(self.tokenizer, news.logprobs)}
            if has_logprobs else None,
            "finish_reason": news.finish_reason,
        }

    def choice(self, choice: Choice) -> dict:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": "".join(choice.text)},
            "logprobs": {"content": chat_logprobs(self.tokenizer, choice.logprobs)}
            if self.want_logprobs else None,
            "finish_reason": choice.finish_reason,
        }


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest) -> Generation:
    check_unserved(req)
    engine = ctx.engine
    urls = None if engine.vision is None else []
    messages = template_messages(req.messages, urls)
    images = []
    if urls:
        engine.vision.check_count(len(urls))
        images = await asyncio.gather(*(
            load_image_bytes(url, ctx.media, f"image {i + 1}") for i, url in enumerate(urls)))
    prompt = await engine.chat_prompt(messages, req.add_generation_prompt is not False, images)
    logprobs = None
    if req.logprobs:  # a beam search reports beam_width alternatives unless told
        beam_search = (req.beam_width or 1) > 1
        logprobs = req.top_logprobs if req.top_logprobs is not None else \
            (req.beam_width if beam_search else 0)
    use_completion_tokens = req.max_completion_tokens is not None
    max_tokens = req.max_completion_tokens if use_completion_tokens else req.max_tokens
    check_max_tokens(max_tokens, "max_completion_tokens" if use_completion_tokens
                     else "max_tokens")
    params = build_sampling_params(
        req, defaults=engine.default_params, logprobs=logprobs,
        max_tokens=max_tokens,
    )
    names = {"prompt": "messages", "logprobs": "top_logprobs"}
    if use_completion_tokens:
        names["max_tokens"] = "max_completion_tokens"
    return Generation("chat", [prompt], params,
                      ChatRenderer(engine.tokenizer, logprobs is not None), names)
