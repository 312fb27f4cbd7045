"""The sampler and stop conditions, against expectations computed from transformers' logits."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from hf_oracle import (
    TIE_TOL,
    assert_greedy_equal,
    chat_ids,
    hf_generate_greedy,
    hf_prompt_logits,
    run,
)

from xllm.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
NUM_SAMPLES = 128  # requests per distribution check


def tokens(llm, prompt: list[int], params: SamplingParams) -> list[int]:
    return run(llm, [prompt], params)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def poem(smol_hf) -> list[int]:
    """A chat prompt with many plausible answers."""
    return chat_ids(smol_hf[1], "Write a short poem about the sea.")


@pytest.fixture(scope="module")
def poem_greedy(smol_llm, poem) -> list[int]:
    return tokens(smol_llm, poem, GREEDY)


# --- seeds and n ---


def test_same_seed_same_tokens_alone_or_in_a_batch(smol_llm, poem):
    params = replace(SAMPLED, seed=1234)
    alone = tokens(smol_llm, poem, params)
    others = [replace(SAMPLED, seed=s) for s in (1, 2, 3)]
    batch = run(smol_llm, [poem] * 5, [params, others[0], params, others[1], others[2]])
    assert batch[0].outputs[0].token_ids == alone
    assert batch[2].outputs[0].token_ids == alone
    assert any(batch[i].outputs[0].token_ids != alone for i in (1, 3, 4)), (
        "three other seeds all gave the same 16 tokens as seed 1234"
    )


def test_n_2_gives_two_different_choices(smol_llm, poem):
    params = replace(SAMPLED, n=2, seed=7, max_tokens=12)
    (out,) = run(smol_llm, [poem], params)
    assert sorted(c.index for c in out.outputs) == [0, 1]
    for choice in out.outputs:
        assert len(choice.token_ids) == 12 and choice.finish_reason == "length"
    first, second = (c.token_ids for c in sorted(out.outputs, key=lambda c: c.index))
    assert first != second, "both choices drew the same 12 tokens"
    (again,) = run(smol_llm, [poem], params)
    assert [c.token_ids for c in sorted(again.outputs, key=lambda c: c.index)] == [first, second]


def test_n_2_greedy_gives_greedy_twice(smol_llm, poem, poem_greedy):
    (out,) = run(smol_llm, [poem], replace(GREEDY, n=2))
    assert [c.token_ids for c in out.outputs] == [poem_greedy, poem_greedy]


# --- filters that leave only the argmax ---


@pytest.mark.parametrize(
    "filters",
    [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)],
    ids=["top_k=1", "min_p=1", "top_p=tiny"],
)
def test_filters_that_keep_one_token_are_greedy(smol_llm, poem, poem_greedy, filters):
    params = replace(SAMPLED, seed=99, temperature=1.3, **filters)
    assert tokens(smol_llm, poem, params) == poem_greedy


# --- logit_bias ---


def test_logit_bias_plus_100_forces_the_token(smol_llm, smol_hf, poem):
    banana = smol_hf[1].encode(" banana", add_special_tokens=False)[0]
    for params in (GREEDY, replace(SAMPLED, seed=5)):
        forced = tokens(smol_llm, poem, replace(params, max_tokens=4, logit_bias={banana: 100.0}))
        assert forced == [banana] * 4


def test_logit_bias_minus_100_picks_the_runner_up(smol_llm, smol_hf, poem, poem_greedy):
    logits = hf_prompt_logits(smol_hf[0], poem)[-1]
    best = int(logits.argmax())
    assert poem_greedy[0] == best
    top3 = logits.topk(3)
    runner_up = int(top3.indices[1])
    assert float(top3.values[1] - top3.values[2]) > TIE_TOL, "runner-up and third are tied"
    params = replace(GREEDY, max_tokens=1, logit_bias={best: -100.0})
    assert tokens(smol_llm, poem, params) == [runner_up]


# --- stops ---


def test_max_tokens_finishes_with_length(smol_llm, poem, poem_greedy):
    (out,) = run(smol_llm, [poem], replace(GREEDY, max_tokens=5))
    choice = out.outputs[0]
    assert choice.token_ids == poem_greedy[:5]
    assert choice.finish_reason == "length"
    assert out.finished


def test_stop_token_ids_stop_at_that_token(smol_llm, poem, poem_greedy):
    k = next(i for i in range(3, len(poem_greedy)) if poem_greedy[i] not in poem_greedy[:i])
    stop = poem_greedy[k]
    (out,) = run(smol_llm, [poem], replace(GREEDY, stop_token_ids=[stop]))
    choice = out.outputs[0]
    assert choice.finish_reason == "stop"
    assert choice.stop_reason == stop
    assert choice.token_ids in (poem_greedy[:k], poem_greedy[: k + 1])


@pytest.fixture(scope="module")
def sky_greedy(smol_llm, smol_hf):
    """A longer greedy answer, as (prompt, token ids, text)."""
    prompt = chat_ids(smol_hf[1], "Explain in two sentences why the sky is blue.")
    (out,) = run(smol_llm, [prompt], replace(GREEDY, max_tokens=40, ignore_eos=False))
    return prompt, out.outputs[0].token_ids, out.outputs[0].text


def pick_stop_string(text: str) -> tuple[str, int]:
    """Two consecutive words from the middle of `text` (several tokens), and where they start."""
    words = text.split(" ")
    assert len(words) >= 8, f"answer too short for the test: {text!r}"
    stop = " " + " ".join(words[4:6])
    return stop, text.index(stop)


@pytest.mark.parametrize("include", [False, True], ids=["excluded", "included"])
def test_stop_string_truncates_text(smol_llm, sky_greedy, include):
    prompt, full_ids, full_text = sky_greedy
    stop, at = pick_stop_string(full_text)
    params = replace(
        GREEDY, max_tokens=40, ignore_eos=False, stop=[stop], include_stop_str_in_output=include
    )
    (out,) = run(smol_llm, [prompt], params)
    choice = out.outputs[0]
    assert choice.finish_reason == "stop"
    assert choice.stop_reason == stop
    assert choice.text == full_text[: at + len(stop) if include else at]
    assert choice.token_ids == full_ids[: len(choice.token_ids)]
    assert len(choice.token_ids) < len(full_ids)


def test_stop_string_never_in_excluded_output(smol_llm, sky_greedy):
    prompt, _, full_text = sky_greedy
    words = [w for w in full_text.split() if len(w) >= 3]
    stops = [words[3], words[6]]
    params = replace(GREEDY, max_tokens=40, ignore_eos=False, stop=stops)
    (out,) = run(smol_llm, [prompt], params)
    at = min(full_text.index(s) for s in stops)
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == full_text[:at]


# --- penalties ---


@pytest.fixture(scope="module")
def repeat_prompt(smol_hf) -> list[int]:
    """A prompt whose greedy answer repeats itself: penalties must change it."""
    return chat_ids(smol_hf[1], "How do I boil an egg?")


def test_repetition_penalty_matches_transformers(smol_llm, smol_hf, repeat_prompt):
    model = smol_hf[0]
    plain = hf_generate_greedy(model, repeat_prompt, 16)
    ref = hf_generate_greedy(model, repeat_prompt, 16, repetition_penalty=1.5)
    assert ref.token_ids != plain.token_ids, "the penalty changes nothing on this prompt"
    got = tokens(smol_llm, repeat_prompt, replace(GREEDY, repetition_penalty=1.5))
    assert got != tokens(smol_llm, repeat_prompt, GREEDY)
    assert_greedy_equal(got, ref, "repetition_penalty=1.5")


def openai_penalties(presence: float, frequency: float):
    """OpenAI's formula over the generated tokens: logit -= presence * [c > 0] + frequency * c."""

    def adjust(logits: torch.Tensor, output_ids: list[int]) -> torch.Tensor:
        for token, count in Counter(output_ids).items():
            logits[token] -= presence + frequency * count
        return logits

    return adjust


@pytest.fixture(scope="module")
def plain_loop(smol_hf):
    """transformers' greedy answers through a do-nothing logits processor, cached per prompt."""
    cache: dict[tuple[int, ...], object] = {}

    def get(prompt: list[int]):
        if tuple(prompt) not in cache:
            cache[tuple(prompt)] = hf_generate_greedy(
                smol_hf[0], prompt, 16, openai_penalties(0, 0)
            )
        return cache[tuple(prompt)]

    return get


@pytest.mark.parametrize(
    "presence, frequency",
    [(1.5, 0.0), (0.0, 0.8), (0.5, 0.5), (-1.0, 0.0), (0.0, -0.7)],
    ids=["presence", "frequency", "both", "negative-presence", "negative-frequency"],
)
def test_presence_frequency_penalties_match_formula(
    smol_llm, smol_hf, repeat_prompt, poem, plain_loop, presence, frequency
):
    # Positive penalties break the repetitive answer; negative ones make the poem repeat.
    prompt = repeat_prompt if presence + frequency > 0 else poem
    ref = hf_generate_greedy(smol_hf[0], prompt, 16, openai_penalties(presence, frequency))
    assert ref.token_ids != plain_loop(prompt).token_ids, "the penalty changes nothing here"
    params = replace(GREEDY, presence_penalty=presence, frequency_penalty=frequency)
    assert_greedy_equal(tokens(smol_llm, prompt, params), ref, f"{presence=} {frequency=}")


def test_repetition_penalty_first_token_by_hand(smol_llm, smol_hf, repeat_prompt):
    """The first token: prompt tokens' logits divided by p if positive, multiplied if not."""
    logits = hf_prompt_logits(smol_hf[0], repeat_prompt)[-1].clone()
    penalty = 2.0  # the largest accepted
    seen = torch.tensor(sorted(set(repeat_prompt)))
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    top2 = logits.topk(2)
    assert float(top2.values[0] - top2.values[1]) > TIE_TOL
    params = replace(GREEDY, max_tokens=1, repetition_penalty=penalty)
    assert tokens(smol_llm, repeat_prompt, params) == [int(top2.indices[0])]


# --- the sampling distribution ---


@pytest.fixture(scope="module")
def fruit(smol_hf) -> tuple[list[int], torch.Tensor]:
    """A short prompt with a wide next-token distribution, and transformers' logits for it."""
    tokenizer = smol_hf[1]
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(
        "The best fruit is", add_special_tokens=False
    )
    return prompt, hf_prompt_logits(smol_hf[0], prompt)[-1]


def first_tokens(llm, prompt: list[int], params: SamplingParams) -> Counter:
    """The first token of NUM_SAMPLES requests with seeds 0.., counted."""
    plist = [replace(params, seed=s, max_tokens=1) for s in range(NUM_SAMPLES)]
    outs = run(llm, [prompt] * NUM_SAMPLES, plist)
    return Counter(o.outputs[0].token_ids[0] for o in outs)


def assert_matches_distribution(counts: Counter, probs: torch.Tensor, what: str) -> None:
    """A chi-square test over the 4 likeliest tokens and the rest (p-value above about 1e-5)."""
    top = probs.topk(4).indices.tolist()
    expected = [float(probs[t]) * NUM_SAMPLES for t in top]
    observed = [counts.get(t, 0) for t in top]
    expected.append(NUM_SAMPLES - sum(expected))
    observed.append(NUM_SAMPLES - sum(observed))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 1e-9)
    assert all(e > 1e-9 or o == 0 for o, e in zip(observed, expected, strict=True)), what
    # 4 degrees of freedom: P(chi2 > 28) is about 1.2e-5.
    assert chi2 < 28.0, f"{what}: observed {observed} vs expected {[round(e, 1) for e in expected]}"


def test_temperature_sampling_follows_softmax(smol_llm, fruit):
    prompt, logits = fruit
    counts = first_tokens(smol_llm, prompt, SamplingParams(temperature=0.7))
    probs = torch.softmax(logits / 0.7, dim=-1)
    assert len(counts) > 3, "temperature 0.7 should not be near greedy here"
    assert_matches_distribution(counts, probs, "temperature 0.7")


def test_top_k_sampling_stays_in_top_k(smol_llm, fruit):
    prompt, logits = fruit
    counts = first_tokens(smol_llm, prompt, SamplingParams(temperature=1.0, top_k=3))
    top3 = logits.topk(3).indices.tolist()
    assert set(counts) <= set(top3)
    probs = torch.zeros_like(logits)
    probs[top3] = torch.softmax(logits[top3], dim=-1)
    assert_matches_distribution(counts, probs, "top_k=3")


def test_top_p_sampling_stays_in_nucleus(smol_llm, fruit):
    prompt, logits = fruit
    top_p = 0.3
    counts = first_tokens(smol_llm, prompt, SamplingParams(temperature=1.0, top_p=top_p))
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the likelier tokens
    nucleus = order[before < top_p + 1e-4].tolist()
    assert 2 <= len(nucleus) < 20
    assert set(counts) <= set(nucleus), f"sampled outside the nucleus {nucleus}: {counts}"
    renormalized = torch.zeros_like(probs)
    renormalized[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert_matches_distribution(counts, renormalized, f"top_p={top_p}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_min_p_sampling_drops_unlikely_tokens(smol_llm, fruit, temperature):
    """min_p keeps the tokens with p >= min_p * p_max of the tempered distribution
    (transformers' order: temperature, then min_p), renormalized."""
    prompt, logits = fruit
    min_p = 0.2
    params = SamplingParams(temperature=temperature, min_p=min_p)
    counts = first_tokens(smol_llm, prompt, params)
    probs = torch.softmax(logits / temperature, dim=-1)
    ratio = probs / probs.max()
    near = ((ratio - min_p).abs() < 0.02 * min_p).nonzero().flatten().tolist()
    assert not near, f"tokens {near} lie on the min_p threshold: the test cannot decide them"
    kept = (ratio >= min_p).nonzero().flatten().tolist()
    assert 2 <= len(kept) <= 6, f"min_p={min_p} keeps {len(kept)} tokens here"
    assert set(counts) <= set(kept), f"sampled below min_p * p_max (kept {kept}): {counts}"
    renormalized = torch.zeros_like(probs)
    renormalized[kept] = probs[kept] / probs[kept].sum()
    assert_matches_distribution(counts, renormalized, f"min_p={min_p} T={temperature}")
