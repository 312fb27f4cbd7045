"""A sequence: one choice of a request, its tokens, cache blocks and progress."""

import enum
from dataclasses import dataclass, field

import torch

from xllm.engine.outputs import TokenLogprob
from xllm.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """Choice `index` of request `request_id`.

    `token_ids` holds the prompt then the output; `num_computed` of them have
    their keys and values in the cache blocks of `block_table`.
    """

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions must still be computed for their logprobs."""
        return self.prompt_logprobs is not None and (
            len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
