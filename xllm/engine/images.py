"""Image inputs of Qwen2-VL / Qwen2.5-VL: bytes to the vision tower's flat patches.

Matches transformers' `Qwen2VLImageProcessorPil` value for value: transparency composited
onto white, Qwen's smart resize with PIL's bicubic filter, rescale and normalize (float64
rescale, float32 normalize, done here through an exact 256-entry table per channel), and the
patch order in which the vision tower reads its input. No EXIF rotation, as the reference.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xllm.engine.errors import InvalidParameter

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses longer/shorter side above this


@dataclass(frozen=True)
class ImageConfig:
    """How images become patches: the model's preprocessor_config.json and server limits."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    max_decoded_pixels: int = 64 * 1024 * 1024  # width * height of the file, before decoding

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                     "max_pixels", "max_decoded_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"image config: {name} must be at least 1")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image config: min_pixels ({self.min_pixels}) is above "
                             f"max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image config: image_mean and image_std need 3 values")
        if any(std == 0 for std in self.image_std):
            raise ValueError("image config: image_std must not be 0")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged patch)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_folder(cls, folder: Path, min_pixels: int | None = None,
                    max_pixels: int | None = None,
                    max_decoded_pixels: int | None = None) -> ImageConfig:
        """Read preprocessor_config.json of a model folder (keys patch_size, temporal_patch_size,
        merge_size, min_pixels/max_pixels or size={"shortest_edge","longest_edge"}, image_mean,
        image_std, rescale_factor); explicit arguments (server flags) override the file."""
        path = Path(folder) / "preprocessor_config.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        values = {k: data[k] for k in ("patch_size", "temporal_patch_size", "merge_size",
                                       "rescale_factor") if data.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if data.get(key) is not None:
                values[key] = tuple(float(x) for x in data[key])
        size = data.get("size") if isinstance(data.get("size"), dict) else {}
        # top-level keys win over size, as in transformers' Qwen2VLImageProcessor.__init__
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            for value in (data.get(key), size.get(edge), size.get(key)):
                if value is not None:
                    values[key] = int(value)
                    break
        overrides = {"min_pixels": min_pixels, "max_pixels": max_pixels,
                     "max_decoded_pixels": max_decoded_pixels}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the vision tower takes it."""

    pixel_values: torch.Tensor  # float32 [grid_t*grid_h*grid_w, 3*temporal*patch*patch]
    grid_thw: tuple[int, int, int]
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens the image takes in the language model's prompt."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


def _refuse(message: str) -> InvalidParameter:
    return InvalidParameter("messages", message)


def _too_many_pixels(exc: Exception, name: str, config: ImageConfig) -> InvalidParameter:
    """Pillow's own guard tripped (a warning only where filters make it an error)."""
    limit = config.max_decoded_pixels
    if Image.MAX_IMAGE_PIXELS:
        pillow = Image.MAX_IMAGE_PIXELS
        limit = min(limit, pillow * 2 if isinstance(exc, Image.DecompressionBombError) else pillow)
    return _refuse(f"{name} has too many pixels (limit {limit})")


def decode_image(data: bytes, config: ImageConfig, name: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF (first frame) bytes to an RGB image; the pixel count is
    checked from the header, before any pixel is decoded."""
    if not data:
        raise _refuse(f"{name} is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(exc, name, config) from None
    except UnidentifiedImageError:
        raise _refuse(f"{name} is not a PNG, JPEG, WebP or GIF image") from None
    except Exception:
        raise _refuse(f"{name} could not be decoded: the file is corrupt") from None
    with image:
        width, height = image.size
        if width * height > config.max_decoded_pixels:
            raise _refuse(f"{name} is {width}x{height} = {width * height} pixels, above the "
                          f"limit of {config.max_decoded_pixels}")
        if width < 1 or height < 1:
            raise _refuse(f"{name} has no pixels ({width}x{height})")
        try:
            image.load()  # the first frame of an animation
            return to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(exc, name, config) from None
        except Exception:
            raise _refuse(f"{name} could not be decoded: the file is truncated or "
                          f"corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha band or a transparent colour) laid over white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, config: ImageConfig,
                 name: str = "image") -> tuple[int, int]:
    """Qwen's target size: sides multiples of `config.factor`, about as many pixels as the
    image within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise _refuse(f"{name} is {width}x{height}: its aspect ratio is above "
                      f"{MAX_ASPECT_RATIO}:1")
    factor = config.factor
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def _value_table(config: ImageConfig) -> np.ndarray:
    """[3, 256] float32: the normalized value of each byte per channel, computed in the same
    precision as the reference (rescale in float64, cast, normalize in float32)."""
    scaled = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None]
    return (scaled[None, :] - mean) / std


def preprocess(image: Image.Image, config: ImageConfig, name: str = "image") -> ProcessedImage:
    """Resize, rescale, normalize and cut an image into patches in the model's order."""
    width, height = image.size
    if width < 1 or height < 1:
        raise _refuse(f"{name} has no pixels ({width}x{height})")
    new_h, new_w = smart_resize(height, width, config, name)
    rgb = to_rgb(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    table = _value_table(config)
    chw = np.stack([table[c][pixels[:, :, c]] for c in range(3)])  # [3, H, W] float32
    patches, grid_h, grid_w = _patchify(chw, config)
    return ProcessedImage(torch.from_numpy(patches), (1, grid_h, grid_w), config.merge_size)


def _patchify(chw: np.ndarray, config: ImageConfig) -> tuple[np.ndarray, int, int]:
    """[3, H, W] to [grid_h*grid_w, 3*temporal*patch*patch]: rows go merge window by merge
    window (each window's patches row-major), a row is channel, time, patch row, patch column;
    the one frame is repeated over the temporal patch."""
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    channels, height, width = chw.shape
    grid_h, grid_w = height // p, width // p
    x = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x).reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w


def process_image(data: bytes, config: ImageConfig, name: str = "image") -> ProcessedImage:
    """Decode and preprocess one image's bytes."""
    return preprocess(decode_image(data, config, name), config, name)
