"""The C++ decoder stack (`xllm.ops.cpu.DecoderStack`, every layer in one call) against its
reference, the model's layer-by-layer path: the same kernels called one by one from Python.

Random-weight Llama and Qwen2 models (float32 rows, float32 packed in panels, int8 rows,
float32 rows with bfloat16 products allowed, and float32 rows over a bfloat16 KV cache) and
the default model (Q4_1 rows) run the same prefill and decode steps both ways from zeroed KV
caches; hidden states and caches must be equal bit for bit, and within 1e-4 of the torch
reference kernels (2e-2 with bfloat16 products or a bfloat16 cache).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen2ForCausalLM as HFQwen2

from xllm import ops
from xllm.model.context import AttentionContext, set_context
from xllm.model.device import huge_page_copies
from xllm.model.llama import (
    Linear,
    LlamaForCausalLM,
    allow_bf16_products,
    allow_int8_products,
    move_weights,
    pack_float_linears,
    quantize_linears,
)
from xllm.ops.quant import QuantizedTensor

cpu = pytest.importorskip("xllm.ops.cpu", reason="the C++ extension is not built")

BLOCK = 4
NUM_BLOCKS = 32
# (prompt lengths of a prefill step), then decode steps of one token per sequence.
PROMPTS = (7, 13)
DECODE_STEPS = 3


def random_model(arch: str, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = HFLlama(LlamaConfig(**common)) if arch == "llama" else HFQwen2(Qwen2Config(**common))
    with torch.no_grad():
        for p in hf.parameters():  # norms away from 1, biases away from 0
            p.add_(torch.randn_like(p) * 0.05)
    model = LlamaForCausalLM(hf.config, 256)
    model.load_weights(hf.state_dict().items())
    return model.eval()


def gguf_linears(model: LlamaForCausalLM) -> None:
    """Every Linear's weight as GGUF rows, quantized by the gguf package: Q4_1 in the layers,
    Q8_0 in the LM head (the default model's formats)."""
    gguf = pytest.importorskip("gguf")
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            qtype = "q8_0" if name == "lm_head" else "q4_1"
            kind = gguf.GGMLQuantizationType[qtype.upper()]
            rows = gguf.quants.quantize(module.weight.detach().numpy(), kind)
            module.quantize(QuantizedTensor(qtype, torch.from_numpy(rows)))


def layer_by_layer(monkeypatch):
    """The model's per-layer path: no backend offers a decoder stack."""
    monkeypatch.setattr(ops, "decoder_stack", lambda x, shape, layers: None)


def run_steps(model: LlamaForCausalLM, seed: int = 0, kv_dtype: torch.dtype = torch.float32):
    """Hidden states of a prefill step of two prompts then DECODE_STEPS decode steps, and
    the KV caches (of kv_dtype) after them."""
    model._stack = None
    attn = model.layers[0].self_attn
    shape = (len(model.layers), NUM_BLOCKS, BLOCK, attn.num_kv_heads, attn.head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype)
    caches = list(zip(k_cache.unbind(0), v_cache.unbind(0)))
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tables = torch.tensor([[0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]], dtype=torch.int32)
    lens = list(PROMPTS)
    hidden = []
    with torch.inference_mode():
        for step in range(DECODE_STEPS + 1):
            new = list(PROMPTS) if step == 0 else [1, 1]
            starts = [0, 0] if step == 0 else [n - 1 for n in lens]
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, new)])
            slots = torch.cat([tables[i, positions_i // BLOCK].long() * BLOCK + positions_i % BLOCK
                               for i, positions_i in enumerate(positions.split(new))])
            query_start = torch.tensor([0, new[0], new[0] + new[1]], dtype=torch.int32)
            seq_lens = torch.tensor([s + n for s, n in zip(starts, new)], dtype=torch.int32)
            set_context(AttentionContext(slots, query_start, seq_lens, tables, caches))
            try:
                ids = torch.randint(vocab, (sum(new),), generator=generator)
                hidden.append(model(ids, positions))
            finally:
                set_context(None)
            lens = [n + 1 for n in seq_lens.tolist()]
    return hidden, k_cache, v_cache


MODELS = {
    "llama-gqa": ("llama", 64, 96, 4, 2, 0),
    "qwen2-bias-mha": ("qwen2", 128, 160, 4, 4, 1),
    "qwen2-gqa-head128": ("qwen2", 256, 64, 2, 1, 2),
}


@pytest.mark.parametrize("rows", ["float32", "float32-panels", "int8", "bf16-products",
                                  "int8-products", "int8-rows-int8-products", "bf16-kv-cache"])
@pytest.mark.parametrize("name", MODELS)
def test_stack_equals_the_layer_by_layer_path(name, rows, monkeypatch):
    model = random_model(*MODELS[name])
    if rows == "int8":
        assert quantize_linears(model) == 4 * len(model.layers) + 1  # and the LM head
    if rows == "float32-panels":
        assert pack_float_linears(model) == 4 * len(model.layers) + 1
        assert model.lm_head.weight is None  # untied: the panels replace the rows
    if rows == "bf16-products":
        assert allow_bf16_products(model) == 4 * len(model.layers) + 1
    if rows.endswith("int8-products"):  # of GGUF rows, or of xllm's int8 rows
        gguf_linears(model) if rows == "int8-products" else quantize_linears(model)
        assert allow_int8_products(model) == 4 * len(model.layers) + 1
    kv_dtype = torch.bfloat16 if rows == "bf16-kv-cache" else torch.float32
    stacked, k_stacked, v_stacked = run_steps(model, kv_dtype=kv_dtype)
    assert isinstance(model._stack[1], cpu.DecoderStack)
    with ops.use_backend("reference"):
        expected, k_ref, v_ref = run_steps(model, kv_dtype=kv_dtype)
    assert model._stack[1] is None  # the reference backend has no stack
    layer_by_layer(monkeypatch)
    layered, k_layered, v_layered = run_steps(model, kv_dtype=kv_dtype)
    assert model._stack[1] is None
    # The reference rounds every product to bfloat16 where allowed, the kernels only in steps
    # past one register block of rows (the prefill here); a key one float32 rounding away from
    # the reference's may round to the neighbouring bfloat16: bfloat16's tolerance for those.
    # Int8 products: an x one float32 rounding away from the reference's may round to the
    # neighbouring int8 (a step of 1/127 of its block's largest value).
    tol = 1e-4 if rows in ("float32", "float32-panels", "int8") else 2e-2
    for a, b, ref in zip(stacked, layered, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=tol, atol=tol)
    assert torch.equal(k_stacked, k_layered) and torch.equal(v_stacked, v_layered)
    torch.testing.assert_close(k_stacked, k_ref, rtol=tol, atol=tol)
    if rows == "bf16-products" and cpu._C.bf16_products(sum(PROMPTS)):  # the flag got through
        plain, _, _ = run_steps(random_model(*MODELS[name]))
        assert not torch.equal(stacked[0], plain[0])
    if rows.endswith("int8-products"):  # x was rounded: not the float32 product of those rows
        plain = random_model(*MODELS[name])
        gguf_linears(plain) if rows == "int8-products" else quantize_linears(plain)
        assert not torch.equal(stacked[0], run_steps(plain)[0][0])
    if rows == "bf16-kv-cache":  # the first layer's keys are float32's rounded, and that shows
        plain, k_plain, _ = run_steps(model)
        assert k_stacked.dtype == torch.bfloat16
        assert torch.equal(k_stacked[0], k_plain[0].to(torch.bfloat16))
        assert not torch.equal(stacked[-1], plain[-1])


@pytest.mark.parametrize("rows", ["float32-tied", "float32-panels", "int8-products"])
def test_weights_moved_into_huge_pages_serve_the_same_floats(rows):
    model = random_model("llama", 64, 96, 4, 2, 5)
    if rows == "float32-tied":
        model.lm_head.weight = model.embed_tokens.weight
    elif rows == "float32-panels":
        pack_float_linears(model)
    else:
        gguf_linears(model)
        allow_int8_products(model)
    before, k_before, _ = run_steps(model)
    def weights() -> list[torch.Tensor]:
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        return [*model.parameters(), *model.buffers(),
                *(m.int8.data for m in linears if m.int8 is not None),
                *(m.panels.data for m in linears if m.panels is not None)]

    tensors = {id(t): t for t in weights()}
    moved = move_weights(model, huge_page_copies)
    assert moved == sum(t.numel() * t.element_size() for t in tensors.values())
    after, k_after, _ = run_steps(model)  # the stack is built again, on the moved weights
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert torch.equal(k_before, k_after)
    now = weights()
    starts = sorted(t.data_ptr() for t in now)  # one block (`zeros`'), tensors end to end
    assert starts[-1] - starts[0] < moved + 64 * len(now)
    if rows == "float32-tied":
        assert model.lm_head.weight is model.embed_tokens.weight


def test_float_rows_of_odd_width_keep_the_layer_by_layer_path():
    model = random_model("llama", 64, 88, 4, 2, 3)  # down_proj's K = 88, not a multiple of 32
    run_steps(model)
    assert model._stack[1] is None


def test_default_model_q4_1(smol_llm, monkeypatch):
    model = smol_llm.engine.runner.model
    assert model.layers[0].mlp.down_proj.qtype == "q4_1"
    stacked, k_stacked, _ = run_steps(model)
    assert isinstance(model._stack[1], cpu.DecoderStack)
    layer_by_layer(monkeypatch)
    layered, k_layered, _ = run_steps(model)
    model._stack = None  # the next tests build theirs again
    for a, b in zip(stacked, layered):
        assert torch.equal(a, b)
    assert torch.equal(k_stacked, k_layered)


def test_bad_input_is_refused():
    model = random_model("llama", 64, 96, 4, 2, 4)
    run_steps(model)
    stack = model._stack[1]
    attn = model.layers[0].self_attn
    k = torch.zeros(NUM_BLOCKS, BLOCK, attn.num_kv_heads, attn.head_dim)
    caches = [(k, k.clone())] * 3
    x, cos, sin = torch.zeros(2, 64), torch.zeros(2, 8), torch.zeros(2, 8)
    slots = torch.tensor([0, 1])
    qsl, lens = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    stack(x, cos, sin, slots, qsl, lens, tables, caches)  # the good call
    with pytest.raises(ValueError, match="3 layers"):
        stack(x, cos, sin, slots, qsl, lens, tables, caches[:2])
    with pytest.raises(ValueError, match="x must be"):
        stack(torch.zeros(2, 32), cos, sin, slots, qsl, lens, tables, caches)
    with pytest.raises(TypeError, match="float32"):
        stack(x.double(), cos, sin, slots, qsl, lens, tables, caches)
    with pytest.raises(ValueError, match="slot"):
        stack(x, cos, sin, torch.tensor([0, NUM_BLOCKS * BLOCK]), qsl, lens, tables, caches)
    with pytest.raises(ValueError, match="query_start_loc"):
        stack(x, cos, sin, slots, qsl[:1], lens, tables, caches)
    bad_caches = [(torch.zeros(NUM_BLOCKS, BLOCK, 1, attn.head_dim),) * 2] * 3
    with pytest.raises(ValueError, match="heads"):
        stack(x, cos, sin, slots, qsl, lens, tables, bad_caches)
