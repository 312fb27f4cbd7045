"""The engine's greedy tokens and logprobs against Hugging Face transformers on the same weights."""

from __future__ import annotations

import gc

import pytest
import torch
from hf_oracle import (
    CHAT_QUESTIONS,
    LOGPROB_TOL,
    TIE_TOL,
    TINY_SPECS,
    Greedy,
    assert_step_logprobs,
    assert_top_logprobs,
    chat_ids,
    check_greedy,
    hf_generate_greedy,
    hf_prompt_logits,
    hf_text_prompts,
    load_hf_folder,
    min_compared,
    run,
)

from xllm import ops
from xllm.engine.sampling_params import SamplingParams
from xllm.model.llama import Linear

SMOL_NEW_TOKENS = 64
TINY_NEW_TOKENS = 32
TOP = 5


def greedy_params(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def smol_prompts(smol_hf) -> list[list[int]]:
    _, tokenizer = smol_hf
    return [chat_ids(tokenizer, q) for q in CHAT_QUESTIONS]


@pytest.fixture(scope="module")
def smol_refs(smol_hf, smol_prompts) -> list[Greedy]:
    model, _ = smol_hf
    return [hf_generate_greedy(model, p, SMOL_NEW_TOKENS) for p in smol_prompts]


@pytest.fixture(scope="module")
def smol_greedy(smol_llm, smol_prompts):
    """The engine's greedy answers to all chat prompts, in one batch, with top-5 logprobs."""
    return run(smol_llm, smol_prompts, greedy_params(SMOL_NEW_TOKENS, logprobs=TOP))


def test_smollm2_greedy_matches_transformers(smol_greedy, smol_refs):
    failures = []
    for i, (out, ref) in enumerate(zip(smol_greedy, smol_refs, strict=True)):
        assert len(out.outputs) == 1
        choice = out.outputs[0]
        assert choice.finish_reason == "length"
        message = check_greedy(choice.token_ids, ref, f"prompt {i} ({CHAT_QUESTIONS[i]!r})")
        if message:
            failures.append(message)
    assert not failures, "\n\n".join(failures)


def test_smollm2_greedy_alone_matches_transformers(smol_llm, smol_prompts, smol_refs):
    out = run(smol_llm, [smol_prompts[0]], greedy_params(SMOL_NEW_TOKENS))
    message = check_greedy(out[0].outputs[0].token_ids, smol_refs[0], "prompt 0 alone")
    assert message is None, message


def test_smollm2_text_is_the_tokenizer_decode(smol_greedy, smol_hf):
    _, tokenizer = smol_hf
    for out in smol_greedy:
        choice = out.outputs[0]
        assert len(choice.token_ids) == SMOL_NEW_TOKENS
        assert choice.text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)


def test_smollm2_chosen_and_top_logprobs(smol_greedy, smol_refs):
    for i, (out, ref) in enumerate(zip(smol_greedy, smol_refs, strict=True)):
        choice = out.outputs[0]
        assert len(choice.token_ids) == SMOL_NEW_TOKENS
        assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
        ref_logprobs = torch.log_softmax(ref.logits, dim=-1)
        compared = 0
        for step, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs, strict=True)):
            if token != ref.token_ids[step]:
                break  # a near tie (check_greedy allows it); later positions differ in context
            what = f"prompt {i} step {step}"
            assert entry.token_id == token, what
            want = float(ref_logprobs[step, token])
            assert abs(entry.logprob - want) <= LOGPROB_TOL, f"{what}: {entry.logprob} vs {want}"
            assert_top_logprobs(entry.top, ref_logprobs[step], TOP, what)
            compared += 1
        assert compared >= min_compared(SMOL_NEW_TOKENS), (
            f"prompt {i}: logprobs of only {compared} steps compared"
        )


def test_smollm2_stops_at_eos(smol_llm, smol_prompts, smol_refs):
    eos = 2  # <|im_end|>, the default model's end of turn
    assert eos in smol_llm.tokenizer.eos_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=SMOL_NEW_TOKENS)
    outs = run(smol_llm, smol_prompts, params)
    stopped = 0
    for i, (out, ref) in enumerate(zip(outs, smol_refs, strict=True)):
        choice = out.outputs[0]
        if eos not in ref.token_ids:
            assert choice.finish_reason == "length"
            assert check_greedy(choice.token_ids, ref) is None
            continue
        k = ref.token_ids.index(eos)
        stopped += 1
        assert choice.finish_reason == "stop", f"prompt {i}"
        assert choice.token_ids in (ref.token_ids[:k], ref.token_ids[: k + 1]), f"prompt {i}"
    assert stopped >= 2, "the prompts were meant to end within 64 tokens"


def check_prompt_logprobs(out, prompt: list[int], logits: torch.Tensor, k: int, what: str):
    ref = torch.log_softmax(logits, dim=-1)
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt), what
    assert entries[0] is None, f"{what}: the first prompt token has no context"
    for pos in range(1, len(prompt)):
        entry = entries[pos]
        assert entry is not None and entry.token_id == prompt[pos], f"{what} position {pos}"
        want = float(ref[pos - 1, prompt[pos]])
        assert abs(entry.logprob - want) <= LOGPROB_TOL, (
            f"{what} position {pos}: {entry.logprob} vs transformers {want}"
        )
        assert_top_logprobs(entry.top, ref[pos - 1], k, f"{what} position {pos}")


def test_smollm2_prompt_logprobs(smol_llm, smol_hf, smol_prompts):
    model, tokenizer = smol_hf
    prompts = [smol_prompts[1], hf_text_prompts(tokenizer, [120])[0]]
    outs = run(smol_llm, prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    for i, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
        check_prompt_logprobs(out, prompt, hf_prompt_logits(model, prompt), 1, f"prompt {i}")


# --- small random-weight Llama and Qwen2 models saved as Hugging Face folders ---


@pytest.fixture(scope="module", params=list(TINY_SPECS))
def tiny(request, tiny_folders):
    """(name, transformers model, engine LLM) of one tiny model; one alive at a time."""
    from xllm.engine.llm import LLM

    name = request.param
    folder = tiny_folders[name]
    llm = LLM(model=str(folder), max_model_len=256, num_blocks=64, max_num_seqs=8)
    yield name, load_hf_folder(folder), llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def tiny_prompts(smol_hf) -> list[list[int]]:
    _, tokenizer = smol_hf
    return [chat_ids(tokenizer, CHAT_QUESTIONS[0])] + hf_text_prompts(tokenizer, [7, 60])


def test_tiny_greedy_matches_transformers(tiny, tiny_prompts):
    name, model, llm = tiny
    outs = run(llm, tiny_prompts, greedy_params(TINY_NEW_TOKENS, logprobs=TOP))
    failures = []
    for i, (out, prompt) in enumerate(zip(outs, tiny_prompts, strict=True)):
        ref = hf_generate_greedy(model, prompt, TINY_NEW_TOKENS)
        choice = out.outputs[0]
        message = check_greedy(choice.token_ids, ref, f"{name} prompt {i}")
        if message:
            failures.append(message)
            continue
        assert choice.logprobs is not None and len(choice.logprobs) == TINY_NEW_TOKENS
        assert_step_logprobs(choice, ref, f"{name} prompt {i}", TOP)
    assert not failures, "\n\n".join(failures)


def test_tiny_float32_linears_run_packed(tiny):
    """The runner packs every float32 Linear in panels (the C++ float32 GEMM's layout); a
    tied LM head keeps the embedding's rows, an untied one's are freed."""
    if not ops.available("cpp"):
        pytest.skip("the C++ kernels are not built")
    name, _, llm = tiny
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.panels is not None for m in linears)
    if "untied" in name:
        assert model.lm_head.weight is None
    else:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_tiny_prompt_logprobs(tiny, tiny_prompts):
    name, model, llm = tiny
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3, logprobs=0)
    outs = run(llm, tiny_prompts, params)
    for i, (out, prompt) in enumerate(zip(outs, tiny_prompts, strict=True)):
        logits = hf_prompt_logits(model, prompt)
        check_prompt_logprobs(out, prompt, logits, 3, f"{name} prompt {i}")
        # logprobs=0: the chosen token's logprob only, which is the prompt's next-token one
        (entry,) = out.outputs[0].logprobs
        assert entry.top == []
        last = logits[-1]
        assert float(last.max() - last[entry.token_id]) <= TIE_TOL, "not the greedy token"
        want = float(torch.log_softmax(last, dim=-1)[entry.token_id])
        assert abs(entry.logprob - want) <= LOGPROB_TOL
