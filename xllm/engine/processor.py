"""Text in, checked prompts out: the chat template, tokenization, and every rule a request
must meet before it reaches the engine (each checked here, once)."""

from xllm.engine.errors import InvalidParameter
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # the model's: what its embedding and logits cover

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> PromptInput:
        """The prompt of a conversation ({"role", "content"} dicts) under the chat template."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        except InvalidParameter:
            raise
        except Exception as exc:  # a template's own raise_exception(), e.g. roles out of order
            raise InvalidParameter(
                "messages", f"the chat template rejected the messages: {exc}") from None
        return PromptInput.of(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, text: str) -> PromptInput:
        """The prompt of a plain text (with the tokenizer's special tokens, e.g. BOS)."""
        return PromptInput.of(self.tokenizer.encode(text, add_special_tokens=True))

    def check(self, prompt: PromptInput, params: SamplingParams) -> None:
        """Raise InvalidParameter if this request cannot be served as asked."""
        params.validate()
        n, limit, vocab = len(prompt), self.max_model_len, self.vocab_size
        if n == 0:
            raise InvalidParameter("prompt", "the prompt is empty")
        for token_id in prompt.token_ids:
            if not 0 <= token_id < vocab:
                raise InvalidParameter(
                    "prompt", f"prompt token id {token_id} is out of range [0, {vocab})")
        if n >= limit:
            raise InvalidParameter(
                "prompt", f"This model's maximum context length is {limit} tokens, "
                f"but the prompt has {n} tokens, leaving no room to generate.")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise InvalidParameter(
                "max_tokens", f"This model's maximum context length is {limit} tokens, but "
                f"{n} prompt tokens plus max_tokens {params.max_tokens} make "
                f"{n + params.max_tokens} tokens.")
        for param, ids in (("logit_bias", params.logit_bias or {}),
                           ("stop_token_ids", params.stop_token_ids)):
            for token_id in ids:
                if not 0 <= token_id < vocab:
                    raise InvalidParameter(
                        param, f"{param}: token id {token_id} is out of range [0, {vocab})")
