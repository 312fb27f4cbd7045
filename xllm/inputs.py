"""What a request asks the engine to read: the one prompt type from the API to the runner."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptInput:
    """A prompt as the engine reads it, carried unchanged from the API to the runner.

    Today a prompt is its token ids. Image inputs will add their pixel data and
    placeholder positions here, and score-only requests (`/v1/sample`) the
    positions whose next-token distributions are wanted.
    """

    token_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def of(cls, token_ids: list[int] | tuple[int, ...]) -> "PromptInput":
        return cls(tuple(token_ids))
