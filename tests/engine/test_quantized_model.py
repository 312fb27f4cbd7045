"""Quantized weights in the engine: the default model served in its own Q4_1 format against the
same weights dequantized to float32, and int8 of a random-weight model against its float32 run;
and the default model with bfloat16 products allowed (--matmul-precision medium), with int8
products (--matmul-precision low), or with a bfloat16 KV cache (--kv-cache-dtype bfloat16),
against float32.

(The default model's engine, whose weights are Q4_1 now, is also compared with transformers'
dequantized model by test_generate_hf.py at 1e-4.)
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from hf_oracle import CHAT_QUESTIONS, LONG_TEXT, chat_ids, run

from xllm.engine.llm import LLM
from xllm.engine.sampling_params import SamplingParams
from xllm.model.llama import Embedding, Linear

NEW_TOKENS = 48
TOP = 5
LOGPROB_TOL = 1e-3
CLEAR = 0.5  # nats between float32's first and second token: not a near tie


def formats(llm: LLM) -> dict[str, int]:
    """How many Linear / Embedding modules of the served model hold each format."""
    counts: dict[str, int] = {}
    for module in llm.engine.runner.model.modules():
        if isinstance(module, Linear | Embedding):
            key = module.qtype or "float32"
            counts[key] = counts.get(key, 0) + 1
    return counts


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def default_model(**options):
    """The default model served with these engine options, freed after the module's tests."""
    llm = LLM("default", max_model_len=1024, num_blocks=128, **options)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def smol_float():
    """The default model with every weight dequantized to float32 (--quantization none)."""
    yield from default_model(quantization="none")


def test_default_model_is_served_in_its_own_formats(smol_llm, smol_float):
    # 30 layers x (qkv, o, gate_up, down) in Q4_1; the embedding and the tied LM head in Q8_0.
    assert formats(smol_llm) == {"q4_1": 120, "q8_0": 2}
    assert formats(smol_float) == {"float32": 122}


def test_q4_1_native_matches_the_dequantized_model(smol_llm, smol_float, smol_hf):
    _, tokenizer = smol_hf
    prompts = [chat_ids(tokenizer, q) for q in CHAT_QUESTIONS]
    params = greedy(NEW_TOKENS, logprobs=TOP)
    native, dense = run(smol_llm, prompts, params), run(smol_float, prompts, params)
    worst = 0.0
    for i, (a, b) in enumerate(zip(native, dense, strict=True)):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids, f"prompt {i}: greedy tokens differ"
        for step, (la, lb) in enumerate(zip(ca.logprobs, cb.logprobs, strict=True)):
            assert [t for t, _ in la.top] == [t for t, _ in lb.top] or _near_tie(lb.top), (
                f"prompt {i} step {step}: top tokens differ")
            worst = max(worst, abs(la.logprob - lb.logprob),
                        *(abs(x - y) for (_, x), (_, y) in zip(la.top, lb.top, strict=True)))
    assert worst <= LOGPROB_TOL, worst


def _near_tie(top: list[tuple[int, float]]) -> bool:
    return any(abs(x - y) < LOGPROB_TOL for (_, x), (_, y) in zip(top, top[1:]))


@pytest.fixture(scope="module")
def tiny_pair(tiny_folders):
    """A random-weight Llama (untied, 3 layers) served in float32 and in int8."""
    folder = tiny_folders["llama-gqa4-untied"]
    dense = LLM(str(folder), quantization="none", num_blocks=64)
    int8 = LLM(str(folder), quantization="int8", num_blocks=64)
    yield dense, int8
    del dense, int8
    gc.collect()


def teacher_forced(llm: LLM, dense: LLM, prompts: list[list[int]],
                   answers: list) -> tuple[int, int, int, int, float]:
    """llm's top token at each answer position of dense's greedy answers, all texts scored in
    one batch: (agree, total, clear_agree, clear, worst |logprob - dense's|), clear counting the
    positions where dense's best token leads its second by more than CLEAR nats."""
    texts = [p + out.outputs[0].token_ids for p, out in zip(prompts, answers, strict=True)]
    scored = run(llm, texts, SamplingParams(max_tokens=1, prompt_logprobs=1))
    reference = run(dense, texts, SamplingParams(max_tokens=1, prompt_logprobs=2))
    agree = total = clear = clear_agree = 0
    worst = 0.0
    for prompt, ids, a, b in zip(prompts, texts, scored, reference, strict=True):
        for pos in range(len(prompt), len(ids)):
            same = a.prompt_logprobs[pos].top[0][0] == ids[pos]
            (_, first), (_, second) = b.prompt_logprobs[pos].top
            total, agree = total + 1, agree + same
            if first - second > CLEAR:
                clear, clear_agree = clear + 1, clear_agree + same
            worst = max(worst, abs(a.prompt_logprobs[pos].logprob - b.prompt_logprobs[pos].logprob))
    return agree, total, clear_agree, clear, worst


def perplexity(llm: LLM, text: list[int]) -> float:
    """Perplexity of the text under llm (its prompt logprobs)."""
    scored = run(llm, [text], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return math.exp(-sum(e.logprob for e in scored.prompt_logprobs[1:]) / (len(text) - 1))


def test_int8_of_a_random_model(tiny_pair, smol_hf):
    dense, int8 = tiny_pair
    assert formats(int8) == {"int8": 3 * 4 + 1, "float32": 1}  # the embedding stays float32
    _, tokenizer = smol_hf
    prompts = [tokenizer(q).input_ids for q in CHAT_QUESTIONS]
    float_runs = run(dense, prompts, greedy(32))
    # Teacher-forced: int8's top token at each position of the float32 model's greedy text,
    # overall and where float32's best token leads its second by more than CLEAR nats.
    agree, total, clear_agree, clear, _ = teacher_forced(int8, dense, prompts, float_runs)
    print(f"int8 top-1 agrees with float32 greedy on {agree} of {total} tokens, "
          f"{clear_agree} of the {clear} with a margin over {CLEAR}")
    # A random model is chaotic: its logits are large (the text's tokens score around -20)
    # and per-row int8 moves them by 0.1 to 0.4 nats, so near ties flip; most tokens agree.
    assert agree >= 0.75 * total, (agree, total, clear_agree, clear)
    # Perplexity of a fixed text within 1%.
    text = tokenizer(LONG_TEXT).input_ids[:256]
    ppl = {name: perplexity(llm, text) for name, llm in (("float32", dense), ("int8", int8))}
    print(f"perplexity of the fixed text: {ppl}")
    assert abs(ppl["int8"] / ppl["float32"] - 1) <= 0.01, ppl


# Eight chats in one batch: decode steps of 8 rows, past the kernels' register block of 4,
# take bfloat16 products where the CPU has them.
BATCH_QUESTIONS = CHAT_QUESTIONS + ["Name a colour.", "What is two plus two?",
                                    "Say hello in French.", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def smol_medium():
    """The default model (Q4_1) with bfloat16 products allowed (--matmul-precision medium)."""
    yield from default_model(matmul_precision="medium")


def batch_agreement(llm: LLM, dense: LLM, smol_hf, label: str) -> tuple[int, int, int, int,
                                                                        float]:
    """`teacher_forced` of llm on dense's greedy answers to the BATCH_QUESTIONS chats (one
    batch), printed with how many of llm's own greedy answers are identical to dense's."""
    _, tokenizer = smol_hf
    prompts = [chat_ids(tokenizer, q) for q in BATCH_QUESTIONS]
    answers = run(dense, prompts, greedy(NEW_TOKENS))
    agree, total, clear_agree, clear, worst = teacher_forced(llm, dense, prompts, answers)
    generated = run(llm, prompts, greedy(NEW_TOKENS))
    identical = sum(x.outputs[0].token_ids == y.outputs[0].token_ids
                    for x, y in zip(generated, answers, strict=True))
    print(f"{label}: top-1 agrees on {agree} of {total} tokens ({clear_agree} of {clear} "
          f"clear), logprobs within {worst:.4f}; {identical} of {len(prompts)} greedy answers "
          f"identical")
    return agree, total, clear_agree, clear, worst


def test_bf16_products_of_the_default_model(smol_medium, smol_float, smol_hf):
    """Teacher-forced on float32's greedy answers (all 8 prompts in one batch), the model with
    bfloat16 products picks the same top token wherever float32's leads by CLEAR nats, and
    its logprobs stay within bfloat16's reach of float32's (~0.06 measured)."""
    from xllm.ops.cpu import _C

    agree, total, clear_agree, clear, worst = batch_agreement(smol_medium, smol_float, smol_hf,
                                                              "bfloat16 products")
    assert clear_agree == clear and agree >= 0.95 * total, (agree, total, clear_agree, clear)
    assert worst <= 0.25, worst
    if _C.bf16_products(len(BATCH_QUESTIONS)):  # they did run: the logprobs moved
        assert worst > 1e-4, worst


@pytest.fixture(scope="module")
def smol_low():
    """The default model (Q4_1) with int8 products (--matmul-precision low)."""
    yield from default_model(matmul_precision="low")


def test_int8_products_of_the_default_model(smol_low, smol_float, smol_llm, smol_hf):
    """x rounded to int8 per block of 32 against the weights' own integers, as llama.cpp
    multiplies Q4_1: teacher-forced on float32's greedy answers (8 prompts in one batch) the
    top token agrees wherever float32's leads by CLEAR nats, and the perplexity of a fixed
    text moves by under 3% (+1.9% measured: the error of every layer's rounding adds up in
    this small model; bfloat16 products moved it by -0.2%)."""
    model = smol_low.engine.runner.model
    packed = [m for m in model.modules() if isinstance(m, Linear) and m.int8 is not None]
    assert len(packed) == 121 and all(m.qdata is None for m in packed)  # the LM head too
    agree, total, clear_agree, clear, worst = batch_agreement(smol_low, smol_float, smol_hf,
                                                              "int8 products")
    assert clear_agree == clear and agree >= 0.9 * total, (agree, total, clear_agree, clear)
    assert 1e-4 < worst <= 0.5, worst  # the rounding shows
    _, tokenizer = smol_hf
    text = tokenizer(LONG_TEXT).input_ids[:256]
    ppl = {name: perplexity(llm, text) for name, llm in
           (("float32", smol_float), ("q4_1", smol_llm), ("int8 products", smol_low))}
    print(f"perplexity of the fixed text: {ppl}")
    assert abs(ppl["int8 products"] / ppl["q4_1"] - 1) <= 0.03, ppl


@pytest.fixture(scope="module")
def smol_bf16_kv():
    """The default model (Q4_1) over a bfloat16 KV cache (--kv-cache-dtype bfloat16)."""
    yield from default_model(kv_cache_dtype="bfloat16")


def test_bf16_kv_cache_of_the_default_model(smol_bf16_kv, smol_llm, smol_hf):
    """Teacher-forced on the float32 cache's greedy answers (8 prompts in one batch), the model
    over a bfloat16 cache picks the same top token wherever float32's leads by CLEAR nats, and
    its logprobs stay within bfloat16's reach."""
    runner = smol_bf16_kv.engine.runner
    assert runner.k_cache.dtype == runner.v_cache.dtype == torch.bfloat16
    agree, total, clear_agree, clear, worst = batch_agreement(smol_bf16_kv, smol_llm, smol_hf,
                                                              "bfloat16 KV cache")
    assert clear_agree == clear and agree >= 0.95 * total, (agree, total, clear_agree, clear)
    assert 1e-5 < worst <= 0.25, worst  # the rounding shows, within bfloat16's reach


def test_bf16_kv_cache_holds_twice_the_blocks():
    sizes = {}
    for kv in ("auto", "bfloat16"):
        llm = LLM("default", kv_cache_dtype=kv, kv_cache_memory=64 << 20, max_model_len=1024)
        sizes[kv] = llm.engine.runner.num_blocks
        del llm
        gc.collect()
    assert sizes["bfloat16"] == 2 * sizes["auto"], sizes


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'"):
        LLM("default", kv_cache_dtype="fp8", num_blocks=8)


def test_unknown_matmul_precision_is_refused():
    with pytest.raises(ValueError, match="highest or medium or low"):
        LLM("default", matmul_precision="high", num_blocks=8)


def test_int8_products_without_vnni_warn(monkeypatch, caplog):
    """Where the CPU lacks AVX-512 VNNI, the portable loop serves: said at startup."""
    from xllm import ops

    monkeypatch.setattr(ops, "int8_products_fast", lambda: False)
    with caplog.at_level("WARNING", logger="xllm.model.runner"):
        llm = LLM("default", matmul_precision="low", max_model_len=256, num_blocks=8)
    assert "lacks AVX-512 VNNI" in caplog.text
    del llm
    gc.collect()
