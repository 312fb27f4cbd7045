"""What the engine hands back for a request, one step at a time."""

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """A token's logprob and the top alternatives at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """The news of one choice since its previous output (a delta).

    `text` is the new detokenized text (held back while it may still turn into
    a stop string or half a character); `token_ids` and `logprobs` are the new
    tokens. `finish_reason` is "stop", "length" or "abort" once it is done.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    score: float | None = None  # beam search: the hypothesis' length-penalized score


@dataclass
class RequestOutput:
    """One step's outputs for a request: only the choices that have news.

    `prompt_logprobs` (first output only, when asked for) has one entry per
    prompt token; the first is None, as the first token has no context.
    `error` is set when the engine failed while serving the request, which is over.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: BaseException | None = None
