"""Qwen2.5-VL in the engine against transformers on the same random weights: the prompt
(placeholders expanded per image), greedy tokens and logprobs with no, one and two images
of different sizes, prefill chunks that end inside an image, and the prefix cache."""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # vl_model

from hf_oracle import LOGPROB_TOL, Greedy, assert_top_logprobs, check_greedy, run  # noqa: E402
from vl_model import build_tiny_qwen2_5_vl, encoded, hf_vl_reference, random_image  # noqa: E402

from xllm.engine.sampling_params import SamplingParams  # noqa: E402

NEW_TOKENS = 16
TOP = 5
CHUNK = 24  # prefill chunks of 24 tokens: most images end up split between steps

CASES = {
    "no image": ("Tell me a story about a red fox.", []),
    "one image": ("Describe this picture.", [(64, 48)]),
    "two images": ("Compare the two pictures.", [(200, 100), (90, 300)]),
    "wide image": ("What is in it?", [(400, 60)]),
    "large image": ("What do you see?", [(640, 480)]),
}


def messages(text: str, count: int) -> list[dict]:
    parts = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts if count else text}]


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def hf(vl_folder):
    return hf_vl_reference(vl_folder)


@pytest.fixture(scope="module")
def llm(vl_folder):
    from xllm.engine.llm import LLM

    engine = LLM(str(vl_folder), max_model_len=2048, num_blocks=512,
                 max_num_batched_tokens=CHUNK)
    yield engine
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def cases(hf, llm):
    """Per case: the engine's prompt, transformers' inputs and its greedy reference."""
    out = {}
    for i, (name, (text, sizes)) in enumerate(CASES.items()):
        images = [random_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
        vision = llm.engine.processor.vision
        processed = [vision.process(encoded(image), j) for j, image in enumerate(images)]
        prompt = llm.engine.processor.chat(messages(text, len(images)), True, processed)
        inputs = hf.processor_inputs(messages(text, len(images)), images)
        tokens, logits = hf.greedy(inputs, NEW_TOKENS)
        out[name] = (prompt, inputs, Greedy(tokens, logits))
    return out


def greedy(logprobs: int | None = TOP, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=logprobs, **kwargs)


def check_output(out, ref: Greedy, what: str) -> None:
    choice = out.outputs[0]
    message = check_greedy(choice.token_ids, ref, what)
    assert message is None, message
    for step, logprob in enumerate(choice.logprobs):
        reference = torch.log_softmax(ref.logits[step].double(), dim=-1)
        assert_top_logprobs(logprob.top, reference, TOP, f"{what}, step {step}")


def test_prompt_equals_the_processor_expansion(cases):
    for name, (prompt, inputs, _) in cases.items():
        assert list(prompt.token_ids) == inputs["input_ids"][0].tolist(), name
        grids = inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()
        assert [list(image.grid_thw) for image in prompt.images] == grids, name
        if prompt.images:
            pixels = torch.cat([image.pixel_values for image in prompt.images])
            torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-6, rtol=0)


def test_greedy_in_one_batch_matches_transformers(llm, cases):
    prompts = [prompt for prompt, _, _ in cases.values()]
    outputs = run(llm, prompts, greedy())
    for (name, (_, _, ref)), out in zip(cases.items(), outputs):
        check_output(out, ref, name)


@pytest.mark.parametrize("name", ["one image", "two images"])
def test_greedy_alone_matches_transformers(llm, cases, name):
    prompt, _, ref = cases[name]
    check_output(run(llm, [prompt], greedy())[0], ref, f"{name} alone")


def test_prompt_logprobs_match_transformers(llm, hf, cases):
    prompt, inputs, _ = cases["two images"]
    out = run(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    reference = torch.log_softmax(hf.prompt_logits(inputs).double(), dim=-1)
    ids = prompt.token_ids
    worst = max(abs(entry.logprob - float(reference[i - 1, ids[i]]))
                for i, entry in enumerate(out[0].prompt_logprobs) if entry is not None)
    assert worst <= LOGPROB_TOL


def test_prefix_cache_reuses_an_image_only_when_it_is_the_same(llm, hf, cases):
    """The same conversation hits the cache and gives the same answer; the same text with
    another image of the same size (equal placeholder tokens) must not reuse its blocks."""
    prompt, _, ref = cases["one image"]
    manager = llm.engine.block_manager
    hits = manager.hits
    check_output(run(llm, [prompt], greedy())[0], ref, "one image, cached")
    assert manager.hits > hits
    text, sizes = CASES["one image"]
    other = random_image(*sizes[0], seed=99)
    vision = llm.engine.processor.vision
    processed = [vision.process(encoded(other), 0)]
    other_prompt = llm.engine.processor.chat(messages(text, 1), True, processed)
    assert other_prompt.token_ids == prompt.token_ids
    tokens, logits = hf.greedy(hf.processor_inputs(messages(text, 1), [other]), NEW_TOKENS)
    check_output(run(llm, [other_prompt], greedy())[0], Greedy(tokens, logits),
                 "one image, another picture")


def test_encoder_cache_is_empty_after_the_requests(llm, cases):
    run(llm, [prompt for prompt, _, _ in cases.values()], greedy(None))
    assert not llm.engine.runner.encoder_cache


def test_positions_of_a_prompt_follow_transformers(hf, cases):
    for name, (prompt, inputs, _) in cases.items():
        if not prompt.images:
            assert prompt.positions is None
            continue
        positions, delta = hf.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"])
        assert np.array_equal(prompt.positions, positions[:, 0].numpy()), name
        assert prompt.position_delta == int(delta), name


def hub_layout(folder: Path, target: Path) -> Path:
    """A copy of `folder` whose config.json is laid out as the released Qwen2.5-VL
    checkpoints' (text keys at the top, `rope_scaling` of type mrope, `in_chans`), and
    whose preprocessor_config.json names min_pixels and max_pixels."""
    shutil.copytree(folder, target)
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config.update(text, rope_theta=rope["rope_theta"],
                  rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    vision = config["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    (target / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    size = processor.pop("size")
    processor.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (target / "preprocessor_config.json").write_text(json.dumps(processor))
    return target


def test_a_hub_layout_folder_serves_the_same(vl_folder, cases, tmp_path):
    from xllm.engine.llm import LLM

    folder = hub_layout(vl_folder, tmp_path / "hub-layout")
    assert "text_config" not in json.loads((folder / "config.json").read_text())
    llm = LLM(str(folder), max_model_len=2048, num_blocks=256)
    prompt, _, ref = cases["two images"]
    text, sizes = CASES["two images"]
    images = [random_image(w, h, seed=20 + j) for j, (w, h) in enumerate(sizes)]
    vision = llm.engine.processor.vision
    again = llm.engine.processor.chat(
        messages(text, 2), True, [vision.process(encoded(im), j) for j, im in enumerate(images)])
    assert again.token_ids == prompt.token_ids
    check_output(run(llm, [again], greedy())[0], ref, "two images, hub layout")


def test_each_image_is_encoded_once_across_prefill_chunks(llm, cases, monkeypatch):
    """With 24-token chunks the two images' tokens span several steps; the encoder runs
    once per image all the same."""
    prompt, _, _ = cases["two images"]
    assert any(image.offset // CHUNK != (image.end - 1) // CHUNK for image in prompt.images)
    model = llm.engine.runner.model
    encoded = []
    real = model.embed_images

    def counting(patches, grids):
        encoded.extend(grids)
        return real(patches, grids)

    monkeypatch.setattr(model, "embed_images", counting)
    llm.engine.block_manager.reset_prefix_cache()
    run(llm, [prompt], greedy(None))
    assert encoded == [image.grid_thw for image in prompt.images]
