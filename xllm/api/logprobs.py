"""Engine logprobs -> OpenAI's chat and completions logprobs shapes (plain dicts)."""

import math

from xllm.engine.outputs import TokenLogprob

_FLOOR = -9999.0  # JSON has no -Infinity; OpenAI-compatible servers clamp like this


def finite(logprob: float) -> float:
    if math.isfinite(logprob):
        return logprob
    return _FLOOR


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> list[dict]:
    """The entries of chat `choices[i].logprobs.content`."""
    token_text, token_bytes = tokenizer.token_text, tokenizer.token_bytes
    return [
        {
            "token": token_text(lp.token_id),
            "logprob": finite(lp.logprob),
            "bytes": token_bytes(lp.token_id),
            "top_logprobs": [
                {"token": token_text(tid), "logprob": finite(value), "bytes": token_bytes(tid)}
                for tid, value in lp.top
            ],
        }
        for lp in logprobs
    ]


class CompletionLogprobs:
    """Accumulates one completions choice's `logprobs`; `text_offset` runs on across calls."""

    def __init__(self, tokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, logprobs: list[TokenLogprob | None], token_ids: list[int] | None = None) -> None:
        """Append entries; a None entry (the first prompt token) needs its id in `token_ids`."""
        token_text = self.tokenizer.token_text
        for i, lp in enumerate(logprobs):
            token_id = lp.token_id if lp is not None else token_ids[i]
            text = token_text(token_id)
            self.tokens.append(text)
            self.text_offset.append(self.offset)
            self.offset += len(text)
            if lp is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
            else:
                self.token_logprobs.append(finite(lp.logprob))
                self.top_logprobs.append({token_text(t): finite(v) for t, v in lp.top})

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def take(self) -> dict:
        """The entries added since the last take (for a stream chunk), then forget them."""
        out = self.to_dict()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out
