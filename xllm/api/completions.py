"""POST /v1/completions: prompt(s) -> Generation; the text completion and chunk shapes
(choices are prompt-major: index = prompt_index * n + choice)."""

from xllm.api.context import ServingContext
from xllm.api.errors import invalid
from xllm.api.generate import Choice, ChoiceNews, Generation, Renderer
from xllm.api.logprobs import CompletionLogprobs
from xllm.api.params import build_sampling_params, check_max_tokens
from xllm.api.protocol import CompletionRequest
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput


def split_prompts(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


class CompletionRenderer(Renderer):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer: Tokenizer, prompts: list[PromptInput],
                 texts: list[str | None], echo: bool, want_logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.texts = texts  # each prompt's text as sent; None for token ids
        self.echo = echo
        self.want_logprobs = want_logprobs
        self.streamed: dict[int, CompletionLogprobs] = {}  # per choice, while streaming

    def _echo_text(self, prompt_index: int) -> str:
        text = self.texts[prompt_index]
        if text is not None:
            return text
        return self.tokenizer.decode(list(self.prompts[prompt_index].token_ids),
                                     skip_special_tokens=False)

    def _start_logprobs(self, choice: Choice) -> CompletionLogprobs:
        """A choice's logprobs, starting with the echoed prompt's when asked for."""
        lp = CompletionLogprobs(self.tokenizer)
        if self.echo and choice.prompt_logprobs is not None:
            lp.add(choice.prompt_logprobs, list(self.prompts[choice.prompt_index].token_ids))
        return lp

    def chunk(self, news: ChoiceNews) -> dict | None:
        choice, text, lp = news.choice, news.text, None
        if news.first and self.echo:
            text = self._echo_text(choice.prompt_index) + text
        if self.want_logprobs:
            if news.first:
                self.streamed[choice.index] = self._start_logprobs(choice)
            lp = self.streamed[choice.index]
            if news.logprobs:
                lp.add(news.logprobs)
        if not text and news.finish_reason is None and not (lp is not None and lp.tokens):
            return None
        return {
            "index": choice.index,
            "text": text,
            "logprobs": lp.take() if lp is not None else None,
            "finish_reason": news.finish_reason,
        }

    def choice(self, choice: Choice) -> dict:
        lp = None
        if self.want_logprobs:
            lp = self._start_logprobs(choice)
            lp.add(choice.logprobs)
        echo = self._echo_text(choice.prompt_index) if self.echo else ""
        return {
            "index": choice.index,
            "text": echo + "".join(choice.text),
            "logprobs": lp.to_dict() if lp is not None else None,
            "finish_reason": choice.finish_reason,
        }


async def prepare_completion(ctx: ServingContext, req: CompletionRequest) -> Generation:
    echo = bool(req.echo)
    check_max_tokens(req.max_tokens, "max_tokens", scoring=echo)
    engine = ctx.engine
    items = split_prompts(req.prompt)
    prompts = [await engine.text_prompt(item) if isinstance(item, str) else PromptInput.of(item)
               for item in items]
    fields = {} if req.max_tokens is None else {"max_tokens": req.max_tokens}
    params = build_sampling_params(
        req, defaults=engine.default_params, logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None, **fields,
    )
    texts = [item if isinstance(item, str) else None for item in items]
    renderer = CompletionRenderer(engine.tokenizer, prompts, texts, echo,
                                  req.logprobs is not None)
    return Generation("completion", prompts, params, renderer)
