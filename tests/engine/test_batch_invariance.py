"""A prompt's greedy output does not depend on its batch, on preemption or on prefill chunking."""

from __future__ import annotations

import gc

import pytest
from hf_oracle import TIE_TOL, run, text_prompts

from xllm.engine.sampling_params import SamplingParams

NEW_TOKENS = 32  # two block boundaries per request: the decodes outgrow the cache
# 16 prompt lengths from 5 to 300 tokens, in a shuffled order.
LENGTHS = [162, 5, 300, 64, 25, 241, 103, 182, 44, 280, 123, 84, 221, 143, 261, 202]
# Top-3 logprobs: the alone run's runner-ups measure how close a divergence was to a tie.
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
# Near ties may cut a comparison short for at most this many of the 16 prompts.
MAX_NEAR_TIES = 3
COMMON = dict(max_model_len=512, block_size=16, max_num_seqs=16, enable_prefix_caching=False)


def make_llm(**kwargs):
    from xllm.engine.llm import LLM

    return LLM("default", **{**COMMON, **kwargs})


BOS = 1  # SmolLM2's <|im_start|>, its BOS


@pytest.fixture(scope="module")
def prompts(roomy_llm) -> list[list[int]]:
    encode = lambda text: roomy_llm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    result = text_prompts(encode, BOS, LENGTHS)
    assert [len(p) for p in result] == LENGTHS
    return result


@pytest.fixture(scope="module")
def roomy_llm():
    llm = make_llm(num_blocks=512)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def alone(roomy_llm, prompts):
    """Each prompt's greedy output, generated with no other request in the engine."""
    return [run(roomy_llm, [p], PARAMS)[0].outputs[0] for p in prompts]


def assert_same_as_alone(outputs, alone, what: str) -> None:
    """Token-for-token equality, except after a step that the alone run found a near tie.

    A near tie: the batch's token is among the alone run's top logprobs at that step,
    within TIE_TOL of the alone run's pick. Most prompts must compare in full.
    """
    failures, ties = [], []
    for i, (out, ref) in enumerate(zip(outputs, alone, strict=True)):
        got = out.outputs[0].token_ids
        assert len(got) == NEW_TOKENS, f"{what}: prompt {i} gave {len(got)} tokens"
        assert len(ref.token_ids) == NEW_TOKENS and len(ref.logprobs) == NEW_TOKENS
        for step, (a, b) in enumerate(zip(got, ref.token_ids, strict=True)):
            if a == b:
                continue
            entry = ref.logprobs[step]
            assert entry.token_id == b and len(entry.top) == PARAMS.logprobs, what
            gap = entry.logprob - dict(entry.top).get(a, float("-inf"))
            if gap <= TIE_TOL:
                ties.append(f"prompt {i} at step {step} (gap {gap:.2e})")
            else:
                failures.append(
                    f"{what}: prompt {i} (length {LENGTHS[i]}) differs at step {step} "
                    f"(alone's logprob gap {gap:.4f})\n  batch: {got}\n  alone: {ref.token_ids}"
                )
            break
    assert not failures, "\n".join(failures)
    if ties:
        print(f"{what}: near ties cut the comparison of {', '.join(ties)}")
    assert len(ties) <= min(MAX_NEAR_TIES, len(outputs) // 4), (
        f"{what}: only {len(outputs) - len(ties)} of {len(outputs)} prompts compared in full; "
        f"near ties: {ties}"
    )


def test_batch_of_16_equals_alone(roomy_llm, prompts, alone):
    outputs = run(roomy_llm, prompts, PARAMS)
    assert_same_as_alone(outputs, alone, "batch of 16")


def test_preemption_equals_alone(prompts, alone):
    # 40 blocks of 16 hold 640 tokens; the 16 requests need about 3,000: the scheduler must
    # preempt running requests and recompute them later.
    llm = make_llm(num_blocks=40)
    try:
        before = llm.engine.num_preemptions
        outputs = run(llm, prompts, PARAMS)
        assert llm.engine.num_preemptions > before, "the small KV cache caused no preemption"
        assert_same_as_alone(outputs, alone, "with preemption")
    finally:
        del llm
        gc.collect()


def test_chunked_prefill_equals_alone(prompts, alone):
    llm = make_llm(num_blocks=512, max_num_batched_tokens=64)
    try:
        outputs = run(llm, prompts, PARAMS)
        assert_same_as_alone(outputs, alone, "chunked prefill (64-token budget)")
    finally:
        del llm
        gc.collect()


def test_prefix_cache_hits_equal_alone(smol_llm, prompts, alone):
    # The shared engine caches prefixes: the second run reuses the first run's full blocks.
    half = slice(0, None, 2)
    manager = smol_llm.engine.block_manager
    first = run(smol_llm, prompts[half], PARAMS)
    hits = manager.hits
    second = run(smol_llm, prompts[half], PARAMS)
    # Every full block of each prompt (but the last token's) was computed by the first run.
    cached = sum((len(p) - 1) // manager.block_size for p in prompts[half])
    assert manager.hits - hits >= cached, (
        f"the warm run hit {manager.hits - hits} cached blocks, expected {cached}"
    )
    assert_same_as_alone(first, alone[half], "prefix caching, cold")
    assert_same_as_alone(second, alone[half], "prefix caching, warm")
