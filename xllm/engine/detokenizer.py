"""Incremental detokenization and stop strings for one sequence.

Text is released only once it is final: never half a multi-byte character,
and never the start of what may still become a stop string.
"""

from xllm.engine.tokenizer import Tokenizer

CONTEXT_TOKENS = 6  # prompt tokens kept as context so the first word decodes right


class Detokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool,
        stop: list[str],
        include_stop: bool,
    ):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far
        self.sent = 0  # how much of it has been released

    def add(self, token_id: int) -> str | None:
        """Add a token; return the stop string it completed, if any."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        start = max(0, len(self.text) - self.hold)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text, stop = cut_at_stop(self.text, self.stop, self.include_stop, start)
        return stop

    def release(self, finished: bool) -> str:
        """The text that became final since the last call."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


def first_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """Where the first of `stops` occurs in `text` from `start`, and which."""
    found = [(at, stop) for stop in stops if (at := text.find(stop, start)) >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: list[str], include_stop: bool, start: int = 0
                ) -> tuple[str, str | None]:
    """`text` ended at its first stop string from `start` (kept when `include_stop`), and
    that stop string (None: no stop string, `text` as it is)."""
    found = first_stop(text, stops, start)
    if found is None:
        return text, None
    at, stop = found
    return text[: at + len(stop) if include_stop else at], stop
