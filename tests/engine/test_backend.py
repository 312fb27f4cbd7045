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

    names = ("paged_attention", "linear", "quant_linear", "dequantize", "rms_norm", "silu_mul",
             "rotary_write_kv")
    for module in (xllm.ops.cpu._C, reference):
        for name in names:
            spy(module, name)
    spy(xllm.ops.cpu._C.DecoderStack, "run")
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    (out,) = smol_llm.generate(["The capital of France is"], params)
    assert len(out.outputs[0].token_ids) == 2
    # A prefill and a decode step, each through the decoder layers in one C++ call, then the
    # final norm and the LM head (Q8_0 rows, as the embedding the step starts from).
    assert calls["DecoderStack", "run"] == 2
    assert calls["xllm._C", "quant_linear"] == 2
    assert calls["xllm._C", "rms_norm"] == 2
    assert calls["xllm._C", "dequantize"] == 2
    for name in ("paged_attention", "linear", "silu_mul", "rotary_write_kv"):
        assert calls["xllm._C", name] == 0, name  # inside the stack
    for name in names:
        assert calls["xllm.ops.reference", name] == 0, name
