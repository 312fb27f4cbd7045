"""Image prompts: what a vision model's prompt needs beyond its text.

The chat template writes one image placeholder token per image; here each placeholder
becomes as many tokens as the image has merged patches, and the prompt gets the
images, their digests and the model's 3-D rotary positions.
"""

from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

import numpy as np

from xllm.config import EngineConfig
from xllm.engine.errors import InvalidParameter
from xllm.engine.images import ImageConfig, ProcessedImage, process_image
from xllm.inputs import ImageInput, PromptInput
from xllm.model.config import is_vision_model
from xllm.model.qwen2_5_vl import mrope_positions


@dataclass(frozen=True)
class VisionSpec:
    """What the engine needs to know of a vision model to build its prompts."""

    image_token_id: int
    images: ImageConfig  # its merge size is the model's
    max_images: int  # per prompt

    @classmethod
    def of(cls, hf_config, folder: Path, config: EngineConfig) -> "VisionSpec | None":
        """The model's spec; None for a text-only model."""
        if not is_vision_model(hf_config):
            return None
        images = ImageConfig.from_folder(folder, config.image_min_pixels,
                                         config.image_max_pixels, config.max_image_pixels)
        return cls(hf_config.image_token_id, images, config.limit_images_per_prompt)

    def check_count(self, count: int) -> None:
        if count > self.max_images:
            raise InvalidParameter(
                "messages", f"too many images: {count}; this server takes at most "
                f"{self.max_images} per prompt")

    def process(self, data: bytes, index: int) -> ProcessedImage:
        """Decode and patch the bytes of image `index` (counted from 0) of a prompt."""
        return process_image(data, self.images, name=f"image {index + 1}")

    def prompt(self, token_ids: list[int], images: list[ProcessedImage]) -> PromptInput:
        """The prompt of templated token ids whose placeholders stand for `images`."""
        places = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(places) != len(images):
            raise InvalidParameter(
                "messages", f"the prompt holds {len(places)} image placeholder tokens for "
                f"{len(images)} images: message text must not contain the placeholder token")
        if not images:
            return PromptInput.of(token_ids)
        ids: list[int] = []
        inputs, previous = [], 0
        for place, image in zip(places, images):
            ids += token_ids[previous:place]
            inputs.append(ImageInput(image.pixel_values, image.grid_thw, len(ids),
                                     image.num_tokens, image_digest(image)))
            ids += [self.image_token_id] * image.num_tokens
            previous = place + 1
        ids += token_ids[previous:]
        positions, delta = mrope_positions(
            len(ids), [(image.offset, image.grid_thw) for image in inputs], self.images.merge_size)
        return PromptInput(tuple(ids), tuple(inputs), positions, delta)


def image_digest(image: ProcessedImage) -> bytes:
    """A digest of an image's grid and pixel values."""
    digest = blake2b(np.asarray(image.grid_thw, dtype=np.int64).tobytes(), digest_size=16)
    digest.update(image.pixel_values.contiguous().numpy())
    return digest.digest()
