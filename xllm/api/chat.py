"""POST /v1/chat/completions: messages -> Generation; the chat response and chunk shapes."""

from xllm.api.context import ServingContext
from xllm.api.errors import invalid
from xllm.api.generate import Choice, ChoiceNews, Generation, Renderer
from xllm.api.logprobs import chat_logprobs
from xllm.api.params import (
    build_sampling_params,
    check_max_tokens,
    check_unserved,
)
from xllm.api.protocol import ChatCompletionRequest, ChatMessage
from xllm.engine.tokenizer import Tokenizer

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
    prompt = await engine.chat_prompt(template_messages(req.messages),
                                      req.add_generation_prompt is not False)
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
