"""What a request asks the engine to read: the one prompt type from the API to the runner."""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image of a prompt: its patches, and the placeholder tokens its embeddings fill."""

    pixel_values: torch.Tensor  # [patches, channels * temporal patch * patch * patch]
    grid_thw: tuple[int, int, int]  # patches along time, height and width
    offset: int  # the prompt position of its first placeholder token
    num_tokens: int
    digest: bytes  # of its pixels and grid: its key in the prefix and encoder caches

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(frozen=True)
class PromptInput:
    """A prompt as the engine reads it, carried unchanged from the API to the runner.

    `images` lie in the prompt in order; a model with multimodal rotary positions
    (M-RoPE) reads a prompt with images at `positions` [3, len], and a token after the
    prompt at its index plus `position_delta` (its three positions are equal).
    """

    token_ids: tuple[int, ...]
    images: tuple[ImageInput, ...] = ()
    positions: np.ndarray | None = field(default=None, compare=False, repr=False)
    position_delta: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def of(cls, token_ids: list[int] | tuple[int, ...]) -> "PromptInput":
        return cls(tuple(token_ids))

    def images_in(self, start: int, end: int) -> list[ImageInput]:
        """The images with a placeholder token in positions [start, end)."""
        return [image for image in self.images if image.offset < end and start < image.end]
