"""Text in, checked prompts out: the chat template, tokenization, and every rule a request
must meet before it reaches the engine (each checked here, once).

A text too long for the context by its character count alone is refused before it is
tokenized: no token covers more than `tokenizer.max_token_chars` characters."""

from xllm.engine.errors import InvalidParameter
from xllm.engine.images import ProcessedImage
from xllm.engine.multimodal import VisionSpec
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 max_n: int, max_beam_width: int, vision: VisionSpec | None = None) -> None:
        self.tokenizer = tokenizer
        self.vision = vision  # None: a text-only model
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # the model's: what its embedding and logits cover
        self.max_n = max_n
        self.max_beam_width = max_beam_width

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_model_len * self.tokenizer.max_token_chars:
            raise InvalidParameter(
                param, f"This model's maximum context length is {self.max_model_len} tokens; "
                f"{num_chars} characters cannot fit in it.")

    def chat(self, messages: list[dict], add_generation_prompt: bool = True,
             images: list[ProcessedImage] = ()) -> PromptInput:
        """The prompt of a conversation ({"role", "content"} dicts) under the chat template.

        A content may be a list of parts: {"type": "text", "text"} and, for a vision
        model, {"type": "image"}, whose images are `images` in order."""
        self._check_chars(sum(map(content_chars, (m.get("content") for m in messages))),
                          "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        except InvalidParameter:
            raise
        except Exception as exc:  # a template's own raise_exception(), e.g. roles out of order
            raise InvalidParameter(
                "messages", f"the chat template rejected the messages: {exc}") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.vision is None:
            return PromptInput.of(ids)
        return self.vision.prompt(ids, list(images))

    def text(self, text: str) -> PromptInput:
        """The prompt of a plain text (with the tokenizer's special tokens, e.g. BOS)."""
        self._check_chars(len(text), "prompt")
        return PromptInput.of(self.tokenizer.encode(text, add_special_tokens=True))

    def pieces(self, pieces: list[str]) -> tuple[PromptInput, list[int]]:
        """The prompt of texts tokenized one by one (so that each piece starts on a token
        boundary; the tokenizer's special tokens, e.g. BOS, come first), and the token
        position where each piece starts."""
        self._check_chars(sum(len(piece) for piece in pieces), "prompt")
        ids = self.tokenizer.encode("", add_special_tokens=True)
        starts = []
        for piece in pieces:
            starts.append(len(ids))
            ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return PromptInput.of(ids), starts

    def check(self, prompt: PromptInput, params: SamplingParams) -> None:
        """Raise InvalidParameter if this request cannot be served as asked."""
        params.validate()
        if params.n > self.max_n:
            raise InvalidParameter("n", f"n must be at most {self.max_n}")
        if params.beam_width > self.max_beam_width:
            raise InvalidParameter(
                "beam_width", f"beam_width must be at most {self.max_beam_width} on this server")
        if params.beam_search and params.max_tokens == 0:
            raise InvalidParameter("max_tokens", "beam search needs max_tokens of at least 1")
        n, limit, vocab = len(prompt), self.max_model_len, self.vocab_size
        if n == 0:
            raise InvalidParameter("prompt", "the prompt is empty")
        points = params.sample_points
        if points and not 0 <= points[0] <= points[-1] < n:
            raise InvalidParameter("sample_points", "sample points must be prompt positions")
        for i, token_id in enumerate(prompt.token_ids):
            if not 0 <= token_id < vocab:
                raise InvalidParameter(
                    "prompt", f"prompt token id at position {i} is out of range [0, {vocab})")
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
            if any(not 0 <= token_id < vocab for token_id in ids):
                raise InvalidParameter(param, f"{param}: a token id is out of range [0, {vocab})")


def content_chars(content: str | list[dict] | None) -> int:
    """The characters of a message content's text."""
    if isinstance(content, str):
        return len(content)
    return sum(len(part.get("text") or "") for part in content or ())
