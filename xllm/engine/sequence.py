"""A sequence: one choice of a request, its tokens, cache blocks and progress."""

import enum
from dataclasses import dataclass, field

import torch

from xllm.engine.outputs import TokenLogprob
from xllm.engine.sampling_params import SamplingParams
from xllm.inputs import PromptInput


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """Choice `index` of request `request_id`.

    `token_ids` holds the prompt then the output; `num_computed` of them have
    their keys and values in the cache blocks of `block_table`. The first
    `num_hashed_blocks` blocks are in the prefix cache, the last of them under
    `prefix_digest` (the chain state the block manager keeps here).
    `wait_for`, when set, is the sequence whose prompt must be in the cache
    before this one is scheduled (the other choices of an n > 1 request).
    `beams`, in beam search, lists the live beams of this sequence's group.
    """

    request_id: str
    index: int
    prompt: PromptInput
    params: SamplingParams
    token_ids: list[int] = field(init=False)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    prefix_digest: bytes = b""
    wait_for: "Sequence | None" = None
    beams: "list[Sequence] | None" = None  # beam search: the group's live beams (shared list)
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    point_logprobs: list[TokenLogprob] = field(default_factory=list)  # /v1/sample's points
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

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
    def prompt_computed(self) -> bool:
        return self.num_computed >= self.num_prompt_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions must still be computed for their logprobs."""
        return self.prompt_logprobs is not None and (
            len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    def logit_positions(self, start: int, end: int) -> list[int]:
        """The prompt positions in [start, end) whose next-token logprobs are asked for:
        the sample points, or every position still missing its prompt logprobs."""
        if self.params.sample_points:
            return [p for p in self.params.sample_points if start <= p < end]
        if not self.needs_prompt_logprobs:
            return []
        first = max(start, len(self.prompt_logprobs) - 1)
        return list(range(first, min(end, self.num_prompt_tokens - 1)))

    @property
    def num_to_compute(self) -> int:
        """How many tokens must be computed: all, but for a /v1/sample request only those
        up to its last sample point (no token is sampled after the prompt)."""
        if self.params.sample_points:
            return self.params.sample_points[-1] + 1
        return self.num_tokens

    @property
    def scored(self) -> bool:
        """Whether everything a request that samples nothing asked for is computed."""
        return (self.num_computed >= self.num_to_compute
                and len(self.point_logprobs) == len(self.params.sample_points))

    def cached_points(self) -> list[int]:
        """The sample points still to compute that the prefix cache has covered: each is
        run again alone for its logits."""
        pending = self.params.sample_points[len(self.point_logprobs) :]
        return [p for p in pending if p < self.num_computed]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
