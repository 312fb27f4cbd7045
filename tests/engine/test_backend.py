"""Which kernels serve the engine on the CPU: the C++ ones, never a silent torch fallback.

xllm.ops.cpu is imported in the tests, so that a missing extension fails them with its reason.
"""

from collections import Counter

import torch

from xllm import ops
from xllm.engine.sampling_params import SamplingParams
from xllm.ops import reference


def test_cpu_tensors_go_to_the_cpp_backend():
    import xllm.ops.cpu

    assert ops.backend_for(torch.zeros(1)) is xllm.ops.cpu


def test_generation_runs_the_cpp_kernels(smol_llm, monkeypatch):
    """Spies on the extension's own entry points, so a Python-side fallback would show."""
    import xllm.ops.cpu

    calls = Counter()

    def spy(module, name):
        kernel = getattr(module, name)

        def counted(*args, **kwargs):
            calls[module.__name__, name] += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module in (xllm.ops.cpu._C, reference):
        for name in ("paged_attention", "linear"):
            spy(module, name)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    (out,) = smol_llm.generate(["The capital of France is"], params)
    assert len(out.outputs[0].token_ids) == 2
    # A prefill and a decode step, each through every layer's attention and projections.
    assert calls["xllm._C", "paged_attention"] >= 2
    assert calls["xllm._C", "linear"] >= 2 * calls["xllm._C", "paged_attention"]
    assert calls["xllm.ops.reference", "paged_attention"] == 0
    assert calls["xllm.ops.reference", "linear"] == 0
