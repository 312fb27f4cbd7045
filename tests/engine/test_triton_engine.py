"""The engine served by the Triton kernels (interpreted on the CPU) against transformers.

Tiny random Llama and Qwen2 models with a tokenizer made on the spot (tests/engine/synthetic.py):
a batch of prompts of different lengths, one longer than `max_num_batched_tokens` (a chunked
prefill), then decode steps; greedy tokens and top logprobs equal transformers' (float64
oracle), and spies show that `xllm.ops.cuda` served every attention and KV write. Interpreted
Triton is slow: small models, few tokens. On a machine with a GPU Triton compiles instead of
interpreting CPU tensors, so this test is skipped there; test_cuda_engine.py covers it.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hf_oracle import (
    assert_step_logprobs,
    check_greedy,
    hf_generate_greedy,
    load_hf_folder,
    run,
)
from synthetic import build_model, build_tokenizer, window_prompts

from xllm import ops
from xllm.engine.sampling_params import SamplingParams
from xllm.ops import reference

if torch.cuda.is_available():
    pytest.skip("a GPU is present: test_cuda_engine.py runs the compiled kernels",
                allow_module_level=True)
triton_ops = pytest.importorskip("xllm.ops.cuda", reason="triton is not installed")
if not triton_ops.INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)

MODELS = {"llama": ("llama", "tiny"), "qwen2": ("qwen2", "tiny-gqa4")}
PROMPT_LENGTHS = [5, 19, 45]
MAX_BATCHED_TOKENS = 32  # below the longest prompt: its prefill runs in chunks
NEW_TOKENS = 6
TOP = 3
# The kernels of every layer, and the logprobs of every step.
LAYER_KERNELS = ("paged_attention", "rotary_write_kv", "rms_norm", "silu_mul")
SPIED = (*LAYER_KERNELS, "topk_logprobs")


@dataclass
class Served:
    name: str
    folder: Path
    num_layers: int
    prompts: list[list[int]]
    outputs: list  # RequestOutput per prompt
    calls: Counter  # (module, kernel) -> calls during generate


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def spy_modules() -> list:
    """The modules whose kernels must not serve (the reference, the C++ kernels if built)."""
    modules = [reference]
    if ops.available("cpp"):
        import xllm.ops.cpu

        modules.append(xllm.ops.cpu)
    return modules


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tokenizer, tmp_path_factory) -> Served:
    """One model's engine run under the Triton backend, with every kernel call counted."""
    from xllm.engine.llm import LLM

    kind, shape = MODELS[request.param]
    folder = build_model(tmp_path_factory.mktemp(request.param), kind, shape, seed=7,
                         tokenizer=tokenizer)
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=128, num_blocks=24,
              max_num_seqs=4, max_num_batched_tokens=MAX_BATCHED_TOKENS)
    prompts = window_prompts(tokenizer, PROMPT_LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            logprobs=TOP)
    calls: Counter = Counter()
    with pytest.MonkeyPatch.context() as patch:
        for module in [triton_ops, *spy_modules()]:
            for name in SPIED:
                patch.setattr(module, name, counted(calls, module, name))
        with ops.use_backend("triton"):
            outputs = run(llm, prompts, params)
    num_layers = len(llm.engine.runner.model.layers)
    del llm
    gc.collect()
    return Served(request.param, folder, num_layers, prompts, outputs, calls)


def counted(calls: Counter, module, name: str):
    kernel = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[module.__name__, name] += 1
        return kernel(*args, **kwargs)

    return wrapper


def test_prompts_need_a_chunked_prefill():
    assert max(PROMPT_LENGTHS) > MAX_BATCHED_TOKENS
    assert sum(PROMPT_LENGTHS) > 2 * MAX_BATCHED_TOKENS


def test_triton_served_every_kernel(served: Served):
    calls = served.calls
    # At least the chunks of the prefill (3) and the decode steps, in every layer.
    steps = 3 + NEW_TOKENS - 1
    for name in LAYER_KERNELS:
        assert calls["xllm.ops.cuda", name] >= steps * served.num_layers, (name, dict(calls))
    assert calls["xllm.ops.cuda", "topk_logprobs"] >= NEW_TOKENS
    others = {key: n for key, n in calls.items() if key[0] != "xllm.ops.cuda" and n}
    assert not others, f"kernels served by another backend: {others}"


def test_triton_greedy_and_logprobs_match_transformers(served: Served):
    model = load_hf_folder(served.folder)
    failures = []
    for i, (prompt, out) in enumerate(zip(served.prompts, served.outputs, strict=True)):
        what = f"{served.name} prompt {i} ({len(prompt)} tokens)"
        ref = hf_generate_greedy(model, prompt, NEW_TOKENS)
        choice = out.outputs[0]
        message = check_greedy(choice.token_ids, ref, what)
        if message:
            failures.append(message)
            continue
        assert choice.finish_reason == "length", what
        assert choice.logprobs is not None and len(choice.logprobs) == NEW_TOKENS, what
        assert_step_logprobs(choice, ref, what, TOP)
    assert not failures, "\n\n".join(failures)


def test_int8_weights_on_triton_match_the_cpp_kernels(tokenizer, tmp_path_factory):
    """The same int8 model (per-row int8 made at load time) under the Triton backend and under
    the C++ kernels: equal greedy tokens, logprobs within 1e-4, every linear through the
    Triton quant_linear."""
    if not ops.available("cpp"):
        pytest.skip("the C++ kernels are not built")
    from xllm.engine.llm import LLM

    folder = build_model(tmp_path_factory.mktemp("int8"), "qwen2", "tiny", seed=11,
                         tokenizer=tokenizer)
    llm = LLM(str(folder), device="cpu", dtype="float32", quantization="int8", max_model_len=128,
              num_blocks=24, max_num_seqs=4, max_num_batched_tokens=MAX_BATCHED_TOKENS)
    prompts = window_prompts(tokenizer, PROMPT_LENGTHS[:2])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=TOP)
    calls: Counter = Counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_ops, "quant_linear", counted(calls, triton_ops, "quant_linear"))
        with ops.use_backend("triton"):
            on_triton = run(llm, prompts, params)
    on_cpp = run(llm, prompts, params)
    layers = len(llm.engine.runner.model.layers)
    assert calls["xllm.ops.cuda", "quant_linear"] >= (4 * layers + 1) * 4  # 4+ steps
    for a, b in zip(on_triton, on_cpp, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) <= 1e-4
