"""Checks of the tiny Qwen2.5-VL fixture: it loads in transformers, generates, sees images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # vl_model, under any pytest import mode

from vl_model import (  # noqa: E402
    DEFAULT_SYSTEM,
    IMAGE_PLACEHOLDER,
    VISION_TOKENS,
    HFVLReference,
    build_tiny_qwen2_5_vl,
    hf_vl_reference,
    random_image,
)

QUESTION = "What is in this picture?"


def image_message(count: int, text: str = QUESTION) -> list[dict]:
    parts = [{"type": "image"} for _ in range(count)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_vl") / "model")


@pytest.fixture(scope="module")
def vl_ref(vl_folder: Path) -> HFVLReference:
    return hf_vl_reference(vl_folder)


def test_folder_contents(vl_folder: Path, vl_ref: HFVLReference) -> None:
    names = {path.name for path in vl_folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(path.stat().st_size for path in vl_folder.iterdir()) < 40e6

    tokenizer, config = vl_ref.tokenizer, vl_ref.model.config
    ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids
    assert config.vision_start_token_id == ids[0]
    assert config.vision_end_token_id == ids[1]
    assert config.image_token_id == ids[3]
    assert config.video_token_id == ids[4]
    assert tokenizer.eos_token == "<|im_end|>"
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.vocab_size >= len(tokenizer)
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]

    generation = json.loads((vl_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    processor = json.loads((vl_folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}


def test_weight_names(vl_folder: Path) -> None:
    from safetensors import safe_open

    with safe_open(vl_folder / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
        dtypes = {handle.get_tensor(name).dtype for name in ["lm_head.weight"]}
    assert dtypes == {torch.float32}
    assert "lm_head.weight" in names
    assert "model.embed_tokens.weight" in names
    assert "visual.patch_embed.proj.weight" in names
    assert "visual.merger.mlp.2.weight" in names
    assert "model.layers.1.self_attn.q_proj.bias" in names


def test_template_string_content(vl_ref: HFVLReference) -> None:
    text = vl_ref.render([{"role": "user", "content": "Hi there"}])
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = vl_ref.tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_template_parts_content(vl_ref: HFVLReference) -> None:
    content = [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": " with "},
        {"type": "image"},
        {"image": "file.png"},
    ]
    messages = [{"role": "user", "content": content}]
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\nCompare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}"
        f"{IMAGE_PLACEHOLDER}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (
        vl_ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == expected
    )
    assert vl_ref.render(messages) == expected


def check_greedy(vl_ref: HFVLReference, inputs: dict, max_new_tokens: int = 8) -> list[int]:
    tokens, logits = vl_ref.greedy(inputs, max_new_tokens)
    assert 1 <= len(tokens) <= max_new_tokens
    assert logits.shape == (len(tokens), vl_ref.model.config.text_config.vocab_size)
    assert tokens == logits.argmax(dim=-1).tolist()
    prompt = vl_ref.prompt_logits(inputs)
    assert prompt.shape[0] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(prompt[-1], logits[0], atol=1e-4, rtol=1e-4)
    return tokens


def test_generate_one_image(vl_ref: HFVLReference) -> None:
    inputs = vl_ref.processor_inputs(image_message(1), [random_image(64, 48)])
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    assert int(inputs["mm_token_type_ids"].sum()) == 4
    assert inputs["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    tokens = check_greedy(vl_ref, inputs)
    assert len(set(tokens)) > 1


def test_generate_two_images(vl_ref: HFVLReference) -> None:
    images = [random_image(90, 200, seed=3), random_image(400, 120, seed=4)]
    inputs = vl_ref.processor_inputs(image_message(2), images)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3) and grid[0].tolist() != grid[1].tolist()
    counts = (grid.prod(dim=-1) // 4).tolist()
    assert int(inputs["mm_token_type_ids"].sum()) == sum(counts)
    assert inputs["pixel_values"].shape[0] == int(grid.prod(dim=-1).sum())
    check_greedy(vl_ref, inputs)


def test_generate_no_image(vl_ref: HFVLReference) -> None:
    inputs = vl_ref.processor_inputs([{"role": "user", "content": QUESTION}], [])
    assert "pixel_values" not in inputs
    assert int(inputs["mm_token_type_ids"].sum()) == 0
    check_greedy(vl_ref, inputs)


def test_images_change_logits(vl_ref: HFVLReference) -> None:
    images = [random_image(64, 48, seed=s) for s in range(2)] + [random_image(48, 64, seed=2)]
    last = [
        vl_ref.prompt_logits(vl_ref.processor_inputs(image_message(1), [i]))[-1] for i in images
    ]
    for a in range(len(last)):
        for b in range(a + 1, len(last)):
            assert (last[a] - last[b]).abs().max() > 0.1


def test_token_types_matter(vl_ref: HFVLReference) -> None:
    """Without mm_token_type_ids transformers gives image tokens 1-D positions, not 3-D ones."""
    inputs = vl_ref.processor_inputs(image_message(1), [random_image(120, 80)])
    plain = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    diff = (vl_ref.prompt_logits(inputs)[-1] - vl_ref.prompt_logits(plain)[-1]).abs().max()
    assert diff > 1e-3


def test_image_count_mismatch(vl_ref: HFVLReference) -> None:
    with pytest.raises(ValueError):
        vl_ref.processor_inputs(image_message(2), [random_image(64, 48)])
