"""The engine on a CUDA GPU against transformers on the same GPU.

Tiny random Llama and Qwen2 models with a tokenizer made on the spot (synthetic.py), so the
test needs no model files. Skipped when torch sees no GPU.

- float32, with CUDA graphs and without (`enforce_eager`): a batch of three prompts of
  different lengths (one prefilled in chunks) whose decode batch shrinks 3 -> 2 -> 1, so
  graphs of padded sizes replay; greedy tokens equal transformers' float32 greedy tokens
  (hf_oracle's tie rule), logprobs within CUDA_LOGPROB_TOL; the same prompts again (prefix
  cache hits) give the same tokens; the Triton wrappers serve attention (eager engine).
- bfloat16 (device and dtype left to "auto"): the logprobs of the prompt and of the engine's
  own greedy answer (its decode steps replay graphs), against transformers float32 reading
  the same tokens (the truth), may err at most about as much as transformers' own bfloat16
  run does, over all positions (see check_bf16); the first greedy token is float32's argmax
  unless within BF16_TIE of it.
- a seeded sampled request gives the same tokens twice, alone and in a batch.
- sleep(2), wake_up(), and the same greedy answers again; every KV block free after each
  generate (hf_oracle.run).

XLLM_TEST_DEVICE=cpu runs the float32 checks on the CPU (to check the test itself where no GPU
is; CUDA graphs, memory figures and bfloat16 are then left out).
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hf_oracle import (
    assert_step_logprobs,
    check_greedy,
    hf_generate_greedy,
    hf_prompt_logits,
    run,
)
from synthetic import build_model, build_tokenizer, window_prompts

from xllm.engine.sampling_params import SamplingParams

DEVICE = os.environ.get("XLLM_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch sees none", allow_module_level=True)

MODELS = {"llama": ("llama", "tiny-hd64"), "qwen2": ("qwen2", "tiny-hd64-gqa4")}
PROMPT_LENGTHS = [7, 40, 90]
NEW_TOKENS = [12, 8, 4]  # per prompt: the decode batch shrinks 3 -> 2 -> 1
MAX_BATCHED_TOKENS = 64  # below the longest prompt: a chunked prefill
MAX_NUM_SEQS = 8  # the graph ladder's top: a batch of 3 replays a padded graph
TOP = 5
# Two float32 implementations on the GPU (different GEMM kernels and summation orders) differ
# by ~1e-5 in these logprobs; a wrong position, mask or scale moves them by > 1e-2.
CUDA_LOGPROB_TOL = 1e-3
# bfloat16 keeps 8 bits of mantissa: logits of magnitude ~10 round by up to ~0.04 per
# operation, and two bf16 implementations drift apart over layers by ~0.1. The engine's
# error against float32 may be at most BF16_ERROR_FACTOR times transformers' own bf16 error
# plus BF16_ERROR_SLACK (max over the prompts' positions), and likewise for the mean. On these
# models transformers' bf16 logprobs err by ~0.05 on average and up to ~0.3 (seen on the CPU).
BF16_ERROR_FACTOR = 2.0
BF16_ERROR_SLACK = 0.05
BF16_NEW_TOKENS = 8
BF16_TIE = 0.75  # first greedy tokens closer than this in float32 logits are a bf16 tie


def engine_kwargs(**extra) -> dict:
    """The engine's settings in these tests (small and explicit: several engines in turn)."""
    kwargs = dict(max_model_len=256, num_blocks=64, max_num_seqs=MAX_NUM_SEQS,
                  max_num_batched_tokens=MAX_BATCHED_TOKENS, gpu_memory_utilization=0.3)
    if DEVICE != "cuda":
        kwargs["device"] = DEVICE
    return kwargs | extra


def release() -> None:
    """Collect what the caller dropped (engines hold GPU memory and CUDA graphs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda_models")
    return {name: build_model(root / name, kind, shape, seed=11, tokenizer=tokenizer)
            for name, (kind, shape) in MODELS.items()}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return window_prompts(tokenizer, PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def hf_models(folders) -> dict[str, torch.nn.Module]:
    """transformers' float32 models on the device."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            .to(DEVICE).eval() for name, folder in folders.items()}


def greedy_params(prompt_index: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS[prompt_index],
                          ignore_eos=True, **kwargs)


@dataclass
class Engine:
    name: str
    eager: bool
    llm: object  # xllm.engine.llm.LLM


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in (True, False)],
                ids=lambda p: f"{p[0]}-{'eager' if p[1] else 'graphs'}")
def engine(request, folders) -> Iterator[Engine]:
    """A float32 engine on the device, with or without CUDA graphs; one alive at a time."""
    from xllm.engine.llm import LLM

    name, eager = request.param
    engine = Engine(name, eager, LLM(str(folders[name]),
                                     **engine_kwargs(dtype="float32", enforce_eager=eager)))
    yield engine
    engine.llm = None
    release()


def test_engine_runs_on_the_device(engine: Engine):
    runner = engine.llm.engine.runner
    assert torch.device(runner.device).type == DEVICE
    assert runner.dtype == torch.float32
    if DEVICE == "cuda":
        # transformers shares this process: TF32 turned on by the engine would change both
        assert torch.get_float32_matmul_precision() == "highest", (
            "float32 matmuls were switched to TF32: float32 runs are no longer exact")


def test_greedy_batch_matches_transformers(engine: Engine, prompts, hf_models):
    model = hf_models[engine.name]
    params = [greedy_params(i, logprobs=TOP) for i in range(len(prompts))]
    outs = run(engine.llm, prompts, params)
    failures = []
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        what = f"{engine.name} eager={engine.eager} prompt {i} ({len(prompt)} tokens)"
        ref = hf_generate_greedy(model, prompt, NEW_TOKENS[i])
        choice = out.outputs[0]
        message = check_greedy(choice.token_ids, ref, what)
        if message:
            failures.append(message)
            continue
        assert choice.logprobs is not None and len(choice.logprobs) == NEW_TOKENS[i], what
        assert_step_logprobs(choice, ref, what, TOP, CUDA_LOGPROB_TOL)
    assert not failures, "\n\n".join(failures)
    # Again: the prompts now come from the prefix cache; the answers must not change.
    again = run(engine.llm, prompts, params)
    for i, (first, second) in enumerate(zip(outs, again, strict=True)):
        assert second.outputs[0].token_ids == first.outputs[0].token_ids, f"prompt {i} again"


def test_triton_serves_attention(engine: Engine, prompts, monkeypatch):
    """Eager steps call the Python wrappers each time, so spies see them (graph replays don't)."""
    if not engine.eager or DEVICE != "cuda":
        pytest.skip("counted on the eager CUDA engine")
    import xllm.ops.cuda as triton_ops
    from xllm.ops import reference

    calls: Counter = Counter()
    for module in (triton_ops, reference):
        for name in ("paged_attention", "rotary_write_kv"):
            kernel = getattr(module, name)

            def counted(*args, _kernel=kernel, _key=(module.__name__, name), **kwargs):
                calls[_key] += 1
                return _kernel(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    run(engine.llm, [prompts[0][:5]], SamplingParams(temperature=0.0, max_tokens=3))
    layers = len(engine.llm.engine.runner.model.layers)
    assert calls["xllm.ops.cuda", "paged_attention"] >= 3 * layers, dict(calls)
    assert calls["xllm.ops.cuda", "rotary_write_kv"] >= 3 * layers, dict(calls)
    assert calls["xllm.ops.reference", "paged_attention"] == 0, dict(calls)
    assert calls["xllm.ops.reference", "rotary_write_kv"] == 0, dict(calls)


def test_seeded_sampling_is_reproducible(engine: Engine, prompts):
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12,
                             ignore_eos=True)
    alone = run(engine.llm, [prompts[1]], sampled)[0].outputs[0].token_ids
    again = run(engine.llm, [prompts[1]], sampled)[0].outputs[0].token_ids
    assert again == alone
    batch = [greedy_params(0), sampled, greedy_params(2)]
    in_batch = run(engine.llm, prompts, batch)[1].outputs[0].token_ids
    assert in_batch == alone, "a seeded request's tokens changed with its batch"
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=12,
                                ignore_eos=True)
    other = run(engine.llm, [prompts[1]], other_seed)[0].outputs[0].token_ids
    assert other != alone, "two seeds gave the same 12 sampled tokens: is it sampling?"


def test_sleep_and_wake_up_give_the_same_answers(engine: Engine, prompts):
    llm = engine.llm
    params = [greedy_params(i, logprobs=2) for i in range(len(prompts))]
    before = run(llm, prompts, params)
    allocated = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    llm.engine.sleep(2)
    assert llm.engine.sleep_level == 2
    if DEVICE == "cuda":
        asleep = torch.cuda.memory_allocated()
        print(f"GPU memory allocated: {allocated / 2**20:.1f} MiB awake, "
              f"{asleep / 2**20:.1f} MiB asleep")
        assert asleep < allocated, "sleep(2) freed no GPU memory"
    llm.engine.wake_up()
    assert llm.engine.sleep_level == 0
    after = run(llm, prompts, params)
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"prompt {i} after wake_up"
        for step, (x, y) in enumerate(zip(a.outputs[0].logprobs, b.outputs[0].logprobs)):
            assert abs(x.logprob - y.logprob) <= 1e-5, f"prompt {i} step {step} after wake_up"


# --- bfloat16 ---


def check_bf16(engine_lp: list[float], hf_lp: list[float], truth_lp: list[float],
                      what: str) -> str:
    """The engine's bf16 logprobs err against float32 at most about as much as
    transformers' bf16 ones: max and mean error within BF16_ERROR_FACTOR times
    transformers' plus BF16_ERROR_SLACK. Returns a line of the figures."""
    engine_err = (torch.tensor(engine_lp) - torch.tensor(truth_lp)).abs()
    hf_err = (torch.tensor(hf_lp) - torch.tensor(truth_lp)).abs()
    line = (f"{what}: bf16 error vs float32, max/mean: engine {engine_err.max():.4f}/"
            f"{engine_err.mean():.4f}, transformers {hf_err.max():.4f}/{hf_err.mean():.4f}")
    print(line)
    assert engine_err.max() <= BF16_ERROR_FACTOR * hf_err.max() + BF16_ERROR_SLACK, line
    assert engine_err.mean() <= BF16_ERROR_FACTOR * hf_err.mean() + BF16_ERROR_SLACK / 5, line
    return line


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_logprobs_and_first_tokens(name, folders, prompts, hf_models):
    """Device and dtype left to "auto": CUDA and bfloat16."""
    from transformers import AutoModelForCausalLM

    from xllm.engine.llm import LLM

    if DEVICE != "cuda":
        pytest.skip("bfloat16 is served on CUDA only")
    llm = LLM(str(folders[name]), **engine_kwargs())
    try:
        assert torch.device(llm.engine.runner.device).type == DEVICE
        assert llm.engine.runner.dtype == torch.bfloat16
        params = SamplingParams(temperature=0.0, max_tokens=BF16_NEW_TOKENS, ignore_eos=True,
                                prompt_logprobs=1, logprobs=0)
        outs = run(llm, prompts, params)
    finally:
        del llm
        release()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.bfloat16)
    hf_bf16 = hf_bf16.to(DEVICE).eval()
    engine_lp, hf_lp, truth_lp = [], [], []
    ties = 0
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        what = f"{name} prompt {i} ({len(prompt)} tokens)"
        choice = out.outputs[0]
        assert len(choice.token_ids) == BF16_NEW_TOKENS, what
        # The prompt and the engine's own answer, read by transformers in one pass: its
        # logprobs at every position, the prompt's and the decode steps' (graph replays).
        full = prompt + choice.token_ids
        truth = torch.log_softmax(hf_prompt_logits(hf_models[name], full), dim=-1)
        hf = torch.log_softmax(hf_prompt_logits(hf_bf16, full), dim=-1)
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt), what
        assert choice.logprobs is not None and len(choice.logprobs) == BF16_NEW_TOKENS, what
        engine_all = [entries[p].logprob for p in range(1, len(prompt))]
        engine_all += [entry.logprob for entry in choice.logprobs]
        for p, logprob in zip(range(1, len(full)), engine_all, strict=True):
            engine_lp.append(logprob)
            hf_lp.append(float(hf[p - 1, full[p]]))
            truth_lp.append(float(truth[p - 1, full[p]]))
        first = choice.token_ids[0]
        last = len(prompt) - 1
        best = int(truth[last].argmax())
        if first != best:
            margin = float(truth[last, best] - truth[last, first])
            assert margin <= BF16_TIE, (
                f"{what}: first token {first}, float32's {best} leads by {margin:.3f}")
            ties += 1
    check_bf16(engine_lp, hf_lp, truth_lp, f"{name}, {len(engine_lp)} positions")
    assert ties < len(prompts), "every first token was a bf16 tie: pick other prompts"
