"""Per-request sampling and stopping parameters, and the ranges they must be in."""

import math
from dataclasses import dataclass, field

from xllm.engine.errors import InvalidParameter

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's range
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows)
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass
class SamplingParams:
    """What to generate and when to stop; validated by `validate()`.

    `max_tokens=None` means: until the end of the context; unset, it is 16, as in
    OpenAI's completions API; 0 only computes the prompt (to score it with
    `prompt_logprobs`). `top_k` above the vocabulary means the whole vocabulary.
    `logprobs=None` means no logprobs; 0 the chosen token only; k also the top k.
    `prompt_logprobs` likewise for the prompt tokens (completions' `echo`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # /v1/sample: prompt positions whose next-token distributions are wanted (sorted; with
    # max_tokens 0 and `logprobs` candidates each), computed in the prompt's prefill
    sample_points: tuple[int, ...] = ()
    beam_width: int = 1  # above 1: beam search (API.md section 3)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers

    @property
    def beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def num_choices(self) -> int:
        """Choices in the answer: the beams of a beam search, else n."""
        return self.beam_width if self.beam_search else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        """Raise InvalidParameter naming the first field out of range (NaN and infinities
        are out of every range)."""
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
             f"must be in [0, {MAX_TEMPERATURE:g}]"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (off) or at least 1"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens",
             "must be non-negative"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             "logprobs", f"must be in [0, {MAX_LOGPROBS}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             "seed", "is out of range"),
            (not self.sample_points or (self.max_tokens == 0 and self.logprobs
                                        and self.prompt_logprobs is None), "sample_points",
             "need max_tokens 0, logprobs of at least 1 and no prompt_logprobs"),
            (list(self.sample_points) == sorted(set(self.sample_points)), "sample_points",
             "must be increasing"),
            (self.beam_width >= 1, "beam_width", "must be at least 1"),
            (self.beam_width == 1 or self.n == 1, "n", "must be 1 with beam search"),
            (math.isfinite(self.length_penalty), "length_penalty", "must be finite"),
            (self.early_stopping in (True, False, "never"), "early_stopping",
             'must be true, false or "never"'),
        ]
        for ok, param, requirement in checks:
            if not ok:
                raise InvalidParameter.must(param, requirement)
        for bias in (self.logit_bias or {}).values():
            if not -100.0 <= bias <= 100.0:
                raise InvalidParameter("logit_bias", "logit_bias values must be in [-100, 100]")
