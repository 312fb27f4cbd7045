"""A tiny random-weight Qwen2.5-VL model folder, and transformers as its oracle.

`build_tiny_qwen2_5_vl` writes a Hugging Face folder (config, safetensors, tokenizer with
Qwen's vision tokens and a Qwen2.5-VL style chat template, image processor config) that
transformers and the engine both load. `hf_vl_reference` wraps transformers' model on it
and builds its inputs without `Qwen2_5_VLProcessor` (which needs torchvision).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD]
EOS_TOKEN = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Small pixel bounds keep the image token counts low: 4 to 64 merged tokens per image.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64

# What one image part renders to in a prompt, before its pad is expanded.
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

# Written for this fixture: renders like Qwen2.5-VL's template for text and image/video parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- set kind = part.get('type') -%}"
    "{%- if kind in ['image', 'image_url'] or 'image' in part or 'image_url' in part -%}"
    "{{ '" + IMAGE_PLACEHOLDER + "' }}"
    "{%- elif kind == 'video' or 'video' in part -%}"
    "{{ '" + VISION_START + VIDEO_PAD + VISION_END + "' }}"
    "{%- elif kind == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)

TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
}

VISION_CONFIG = {
    "depth": 4,
    "hidden_size": 32,
    "hidden_act": "silu",
    "num_heads": 2,
    "intermediate_size": 64,
    "out_hidden_size": 64,
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 4,
}


def build_tiny_tokenizer(folder: Path):
    """SmolLM2's tokenizer with Qwen's vision tokens and chat template, saved into `folder`."""
    from transformers import AutoTokenizer

    from xllm.model.loader import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(tokenizer):
    """The small Qwen2_5_VLConfig whose special token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text = dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at unit-variance scale, so outputs depend strongly on inputs.

    Matrices get std 1/sqrt(fan_in), embeddings std 1, biases std 0.1 and norm weights
    1 + 0.1 noise: nothing is left at the default zero or one that could hide a loading bug.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim == 1 and ("norm" in name or "ln_q" in name):
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            param.copy_(noise)
        else:
            fan_in = math.prod(param.shape[1:])
            param.copy_(noise / math.sqrt(fan_in))


def build_tiny_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    """Write a small random-weight Qwen2.5-VL model folder; return it."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder)
    config = tiny_config(tokenizer)
    with torch.random.fork_rng():  # a fixed seed without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    randomize_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor.save_pretrained(folder)
    return folder


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise image of the given size."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    """The image as a file of the given format."""
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def is_image_part(part: dict) -> bool:
    return part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part


class HFVLReference:
    """Transformers' Qwen2.5-VL on a model folder: input building, greedy decoding, logits."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.folder)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.folder, dtype=dtype)
        self.model = model.eval()
        self.image_token_id = self.model.config.image_token_id
        self.merge_size = self.image_processor.merge_size

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text, image parts normalized to {"type": "image"}."""
        plain = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = [{"type": "image"} if is_image_part(p) else p for p in content]
            plain.append({**message, "content": content})
        return self.tokenizer.apply_chat_template(
            plain, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def image_inputs(self, images: list[Image.Image]) -> dict:
        """pixel_values [patches, 1176] and image_grid_thw [images, 3] of the images."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def processor_inputs(self, messages: list[dict], images: list[Image.Image]) -> dict:
        """What Qwen2_5_VLProcessor would give generate: ids, mask, pixels, grids, token types."""
        text = self.render(messages)
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} image parts but {len(images)} images")
        inputs: dict = {}
        if images:
            inputs = self.image_inputs(images)
            counts = inputs["image_grid_thw"].prod(dim=-1) // self.merge_size**2
            expanded = [pieces[0]]
            for count, piece in zip(counts.tolist(), pieces[1:]):
                expanded.append(IMAGE_PAD * count + piece)
            text = "".join(expanded)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = torch.ones_like(input_ids)
        inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return inputs

    def cast(self, inputs: dict) -> dict:
        """The inputs with pixel_values in the model's dtype."""
        out = dict(inputs)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

    @torch.no_grad()
    def greedy(self, inputs: dict, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy new tokens (stopping at eos) and their raw logits [steps, vocab] in float32."""
        out = self.model.generate(
            **self.cast(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, prompt_len:].tolist()
        logits = torch.cat([step.float() for step in out.logits], dim=0)
        return tokens, logits

    @torch.no_grad()
    def prompt_logits(self, inputs: dict) -> torch.Tensor:
        """Logits [seq, vocab] in float32 of one forward pass over the prompt."""
        return self.model(**self.cast(inputs), use_cache=False).logits[0].float()


def hf_vl_reference(folder: Path, dtype: torch.dtype = torch.float32) -> HFVLReference:
    """The transformers oracle on a folder written by `build_tiny_qwen2_5_vl`."""
    return HFVLReference(folder, dtype)
