"""The engine's Qwen2-VL image preprocessing against transformers' PIL image processor."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xllm.engine.errors import InvalidParameter
from xllm.engine.images import (
    ImageConfig,
    ProcessedImage,
    decode_image,
    preprocess,
    process_image,
)

oracle_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
Oracle = oracle_module.Qwen2VLImageProcessorPil


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of `mode` (made from random RGB/RGBA bytes)."""
    rng = np.random.default_rng(seed)
    channels = 4 if mode in ("RGBA", "LA", "CMYK") else 3
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    base = Image.fromarray(arr, "RGBA" if channels == 4 else "RGB")
    if mode == "CMYK":
        return Image.frombytes("CMYK", base.size, base.tobytes())
    return base.convert(mode) if mode != base.mode else base


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def oracle(data: bytes, **kwargs) -> tuple[np.ndarray, tuple[int, int, int]]:
    out = Oracle(**kwargs)(images=Image.open(io.BytesIO(data)), return_tensors="np")
    return out["pixel_values"], tuple(int(x) for x in out["image_grid_thw"][0])


def assert_matches(data: bytes, config: ImageConfig | None = None,
                   **oracle_kwargs) -> ProcessedImage:
    """Our result on `data` equals the oracle's, bit for bit."""
    config = config or ImageConfig(**oracle_kwargs)
    ours = process_image(data, config)
    ref_values, ref_grid = oracle(data, **oracle_kwargs)
    assert ours.grid_thw == ref_grid
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref_values.shape
    np.testing.assert_array_equal(ours.pixel_values.numpy(), ref_values)
    t, h, w = ours.grid_thw
    assert ours.num_tokens == t * h * w // 4
    return ours


def refusal(data: bytes, config: ImageConfig | None = None, name: str = "image 2") -> str:
    with pytest.raises(InvalidParameter) as info:
        process_image(data, config or ImageConfig(), name=name)
    assert info.value.param == "messages"
    assert name in info.value.message
    return info.value.message


@pytest.mark.parametrize("size", [
    (20, 30), (1, 1), (2, 2), (224, 224), (640, 480), (1000, 50), (50, 1000), (333, 777),
    (29, 57), (1, 200), (200, 1), (3000, 2000), (27, 1399),
])
def test_sizes_match_oracle(size: tuple[int, int]) -> None:
    assert_matches(encode(noise(*size)))


def test_small_image_upscales_and_large_downscales() -> None:
    small = process_image(encode(noise(20, 30)), ImageConfig())
    assert small.grid_thw == (1, 6, 4)  # 84x56 pixels: at least min_pixels
    big = process_image(encode(noise(3000, 2000)), ImageConfig())
    _, h, w = big.grid_thw
    assert h * w * 14 * 14 <= ImageConfig().max_pixels
    assert (h, w) == (58, 86)


@pytest.mark.parametrize(("size", "min_pixels", "max_pixels"), [
    ((640, 480), 256 * 28 * 28, 512 * 28 * 28),
    ((640, 480), 28 * 28, 28 * 28 * 4),
    ((100, 80), 128 * 28 * 28, 1280 * 28 * 28),
    ((1920, 1080), 3136, 12845056),
])
def test_custom_min_max_pixels(size: tuple[int, int], min_pixels: int, max_pixels: int) -> None:
    ours = assert_matches(encode(noise(*size)), min_pixels=min_pixels, max_pixels=max_pixels)
    ref_patches = Oracle(min_pixels=min_pixels, max_pixels=max_pixels
                         ).get_number_of_image_patches(size[1], size[0])
    assert ours.num_tokens == ref_patches // 4


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "1", "I;16"])
def test_png_modes(mode: str) -> None:
    image = noise(61, 47, mode)
    if mode == "I;16":
        image = Image.fromarray(np.arange(61 * 47, dtype=np.uint16).reshape(47, 61) * 21)
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert_matches(data)


def test_png_palette_with_transparency() -> None:
    image = noise(50, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = encode(image, transparency=3)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    assert_matches(data)


def test_png_rgb_with_transparent_colour() -> None:
    image = noise(40, 40)
    image.putpixel((0, 0), (10, 20, 30))
    assert_matches(encode(image, transparency=(10, 20, 30)))


def test_alpha_is_laid_over_white() -> None:
    clear = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    decoded = decode_image(encode(clear), ImageConfig())
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    values = process_image(encode(clear), ImageConfig()).pixel_values
    mean = torch.tensor(ImageConfig().image_mean)
    std = torch.tensor(ImageConfig().image_std)
    white = (1.0 - mean) / std
    torch.testing.assert_close(values.view(-1, 3, 2 * 14 * 14)[:, :, 0],
                               white.expand(values.shape[0], 3))
    assert_matches(encode(clear))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg(mode: str) -> None:
    assert_matches(encode(noise(300, 200, mode), "JPEG", quality=90))


@pytest.mark.parametrize(("mode", "lossless"), [("RGB", False), ("RGBA", True), ("RGBA", False)])
def test_webp(mode: str, lossless: bool) -> None:
    assert_matches(encode(noise(123, 77, mode), "WEBP", lossless=lossless))


def test_gif() -> None:
    assert_matches(encode(noise(90, 60).convert("P")))
    assert_matches(encode(noise(90, 60).convert("P"), "GIF", transparency=0))


def test_animated_gif_first_frame() -> None:
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    ours = assert_matches(data)
    only_red = process_image(encode(red, "GIF"), ImageConfig())
    torch.testing.assert_close(ours.pixel_values, only_red.pixel_values, rtol=0, atol=0)
    assert decode_image(data, ImageConfig()).getpixel((3, 3)) == (255, 0, 0)


def test_patch_layout() -> None:
    ours = process_image(encode(noise(56, 56)), ImageConfig())
    assert ours.grid_thw == (1, 4, 4)
    rows = ours.pixel_values.view(16, 3, 2, 14, 14)
    torch.testing.assert_close(rows[:, :, 0], rows[:, :, 1], rtol=0, atol=0)  # one frame twice


def test_preprocess_takes_any_pil_image() -> None:
    image = noise(100, 70, "RGBA")
    ours = preprocess(image, ImageConfig())
    ref = Oracle()(images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ours.pixel_values.numpy(), ref)


# --- from_folder


def assert_folder_matches(folder: Path, config: ImageConfig) -> None:
    data = encode(noise(800, 300))
    ours = process_image(data, config)
    out = Oracle.from_pretrained(folder)(images=Image.open(io.BytesIO(data)),
                                         return_tensors="np")
    assert ours.grid_thw == tuple(int(x) for x in out["image_grid_thw"][0])
    np.testing.assert_array_equal(ours.pixel_values.numpy(), out["pixel_values"])


def test_from_folder_save_pretrained(tmp_path: Path) -> None:
    Oracle(min_pixels=100 * 28 * 28, max_pixels=200 * 28 * 28).save_pretrained(tmp_path)
    assert "size" in json.loads((tmp_path / "preprocessor_config.json").read_text())
    config = ImageConfig.from_folder(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (100 * 28 * 28, 200 * 28 * 28)
    assert config.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert_folder_matches(tmp_path, config)


def test_from_folder_min_max_pixels_keys(tmp_path: Path) -> None:
    # The shape of Qwen2.5-VL's own file on the Hub (top-level keys win over `size`).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 64 * 28 * 28, "max_pixels": 128 * 28 * 28,
        "size": {"shortest_edge": 3136, "longest_edge": 12845056},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
        "image_processor_type": "Qwen2VLImageProcessor",
    }))
    config = ImageConfig.from_folder(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (64 * 28 * 28, 128 * 28 * 28)
    assert config.image_std == (0.2, 0.25, 0.3)
    assert_folder_matches(tmp_path, config)


def test_from_folder_overrides_and_defaults(tmp_path: Path) -> None:
    assert ImageConfig.from_folder(tmp_path) == ImageConfig()  # no file: the defaults
    Oracle(min_pixels=1000, max_pixels=200000).save_pretrained(tmp_path)
    config = ImageConfig.from_folder(tmp_path, min_pixels=2000, max_pixels=300000,
                                     max_decoded_pixels=1234)
    assert (config.min_pixels, config.max_pixels, config.max_decoded_pixels) == (
        2000, 300000, 1234)
    config = ImageConfig.from_folder(tmp_path, max_pixels=500000)
    assert (config.min_pixels, config.max_pixels) == (1000, 500000)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="min_pixels"):
        ImageConfig(min_pixels=1000, max_pixels=10)
    with pytest.raises(ValueError, match="patch_size"):
        ImageConfig(patch_size=0)


# --- refusals


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` 1-bit pixels but holds no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_empty() -> None:
    assert refusal(b"") == "image 2 is empty"
    with pytest.raises(InvalidParameter, match="^image is empty$"):
        decode_image(b"", ImageConfig())


def test_garbage_and_other_formats() -> None:
    assert "not a PNG, JPEG, WebP or GIF" in refusal(b"this is not an image at all")
    assert "not a PNG, JPEG, WebP or GIF" in refusal(encode(noise(10, 10), "BMP"))
    assert "not a PNG, JPEG, WebP or GIF" in refusal(b"\x89PNG\r\n\x1a\n")


def test_truncated() -> None:
    data = encode(noise(200, 200))
    assert "truncated or corrupt" in refusal(data[: len(data) // 2])
    assert "truncated or corrupt" in refusal(png_header(100, 100))
    jpeg = encode(noise(200, 200), "JPEG")
    message = refusal(jpeg[:300])
    assert "truncated" in message or "corrupt" in message


def test_over_max_decoded_pixels_refused_before_decoding(monkeypatch) -> None:
    data = encode(Image.new("1", (9000, 9000)))  # 81 M pixels in a few kB
    assert len(data) < 100_000
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: loads.append(1))
    message = refusal(data)
    assert "9000x9000" in message and str(64 * 1024 * 1024) in message
    assert not loads
    small = ImageConfig(max_decoded_pixels=100 * 100)
    assert "101x100" in refusal(png_header(101, 100), small)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_guards() -> None:
    # Above Pillow's own hard limit: Image.open itself raises DecompressionBombError.
    huge = ImageConfig(max_decoded_pixels=10**12)
    assert "too many pixels (limit 178956970)" in refusal(png_header(20000, 20000), huge)
    assert "too many pixels (limit 67108864)" in refusal(png_header(20000, 20000))
    assert "10000x10000" in refusal(png_header(10000, 10000))  # only Pillow's warning: ours


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_as_error() -> None:
    huge = ImageConfig(max_decoded_pixels=10**12)
    assert "too many pixels (limit 89478485)" in refusal(png_header(10000, 10000), huge)


@pytest.mark.parametrize("size", [(1, 201), (201, 1), (3, 700), (1000, 4)])
def test_extreme_aspect_ratio(size: tuple[int, int]) -> None:
    data = encode(noise(*size))
    assert "aspect ratio" in refusal(data)
    assert f"{size[0]}x{size[1]}" in refusal(data)
    with pytest.raises(ValueError, match="aspect ratio"):
        oracle(data)
