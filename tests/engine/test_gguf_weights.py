"""GGUF weights read natively: Hugging Face names and shapes, quantized bytes kept, q/k unpermuted.

Small synthetic files of each native format, checked against the gguf package's own
dequantization and transformers' reverse permutation; and the default model's file, checked
tensor by tensor against the float32 folder transformers' GGUF loader converts it into.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from xllm.model.gguf_weights import gguf_quant_types, iterate_gguf_weights  # noqa: E402
from xllm.ops import reference  # noqa: E402
from xllm.ops.quant import QuantizedTensor, quant_format  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB = 256, 512, 64
HEADS, KV_HEADS = 4, 2
HEAD_DIM = HIDDEN // HEADS

NATIVE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}
# Byte offsets of the f16 scale fields within a block, for the types written as random bytes.
F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}


def quantized_bytes(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of `qtype`: quantized random weights, or random blocks."""
    gtype = GT[qtype]
    if qtype not in F16_FIELDS:
        return gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), gtype)
    block, block_bytes = gguf.GGML_QUANT_SIZES[gtype]
    data = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, (rows, cols // block)).astype(np.float16)
        data[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def write_model(path: Path, arch: str, qtype: str, rng: np.random.Generator) -> dict:
    """A one-block model: matrices of `qtype`, norms in F32 / F16 / BF16, a q bias, rope_freqs.

    Returns {GGUF name: (float32 weights as GGUF stores them, GGUF type name)}.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    matrices = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_up.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTERMEDIATE),
        "output.weight": (VOCAB, HIDDEN),
    }
    written = {}
    for name, (rows, cols) in matrices.items():
        data = quantized_bytes(qtype, rows, cols, rng)
        writer.add_tensor(name, data, raw_dtype=GT[qtype])
        written[name] = (gguf_dequantize(data, GT[qtype]).reshape(rows, cols), qtype)
    vectors = {
        "blk.0.attn_norm.weight": ("F32", HIDDEN),
        "blk.0.ffn_norm.weight": ("F16", HIDDEN),
        "output_norm.weight": ("BF16", HIDDEN),
        "blk.0.attn_q.bias": ("F32", HEADS * HEAD_DIM),
        "blk.0.attn_k.bias": ("F16", KV_HEADS * HEAD_DIM),
        "rope_freqs.weight": ("F32", HEAD_DIM // 2),
    }
    for name, (dtype, size) in vectors.items():
        values = rng.standard_normal(size).astype(np.float32)
        if dtype == "BF16":
            data = gguf_quantize(values, GT.BF16)
            writer.add_tensor(name, data, raw_dtype=GT.BF16)
            values = gguf_dequantize(data, GT.BF16)
        else:
            values = values.astype(np.float16 if dtype == "F16" else np.float32)
            writer.add_tensor(name, values)
        written[name] = (values.astype(np.float32), dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def hf_expected(written: dict, permute: bool) -> dict[str, np.ndarray]:
    """Hugging Face names -> float32 weights, q/k put back by transformers' own code."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(
        config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    )
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "output_norm.weight": "model.norm.weight",
    }
    parts = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    expected = {}
    for name, (values, _) in written.items():
        if name.startswith("blk.0."):
            part, kind = name.removeprefix("blk.0.").split(".")
            hf = f"model.layers.0.{parts[part]}.{kind}"
        elif name in names:
            hf = names[name]
        else:
            continue  # rope_freqs
        if permute:
            values = processor.process(weights=values, name=name).weights
        expected[hf] = values
    return expected


@pytest.mark.parametrize("qtype", list(NATIVE))
def test_native_formats(tmp_path: Path, qtype: str) -> None:
    rng = np.random.default_rng(list(NATIVE).index(qtype))
    path = tmp_path / f"tiny-{qtype}.gguf"
    written = write_model(path, "llama", qtype, rng)
    expected = hf_expected(written, permute=True)
    got = dict(iterate_gguf_weights(path, "llama", HEADS, KV_HEADS))
    assert set(got) == set(expected)
    assert gguf_quant_types(path) == {qtype: 9, "F32": 3, "F16": 2, "BF16": 1}
    for name, want in expected.items():
        tensor = got[name]
        if want.ndim == 2:
            assert isinstance(tensor, QuantizedTensor), name
            assert tensor.qtype == NATIVE[qtype]
            assert tensor.data.dtype == torch.uint8
            row_bytes = quant_format(tensor.qtype).row_bytes(want.shape[1])
            assert tuple(tensor.data.shape) == (want.shape[0], row_bytes), name
            assert tuple(tensor.shape) == want.shape
            values = reference.dequantize(tensor.data, tensor.qtype)
        else:
            assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32, name
            values = tensor
        assert tuple(values.shape) == want.shape, name
        torch.testing.assert_close(values, torch.from_numpy(want), rtol=0, atol=1e-6, msg=name)
    # The permutation did move rows: q and k differ from the file's order.
    q = written["blk.0.attn_q.weight"][0]
    assert not np.array_equal(expected["model.layers.0.self_attn.q_proj.weight"], q)


def test_other_formats_dequantized_and_no_permutation(tmp_path: Path) -> None:
    """A format without a native kernel (Q5_0) loads as float32; qwen2's q/k are not permuted."""
    path = tmp_path / "tiny-q5_0.gguf"
    written = write_model(path, "qwen2", "Q5_0", np.random.default_rng(7))
    expected = hf_expected(written, permute=False)
    got = dict(iterate_gguf_weights(path, "qwen2", HEADS, KV_HEADS))
    assert set(got) == set(expected)
    for name, want in expected.items():
        tensor = got[name]
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, torch.from_numpy(want), rtol=0, atol=0, msg=name)


def test_default_model_matches_transformers_conversion() -> None:
    """Every tensor of SmolLM2's file, dequantized, is transformers' float32 conversion's."""
    from transformers import AutoConfig

    from xllm.model.loader import convert_gguf, default_gguf, iterate_weights

    path = default_gguf()
    folder = convert_gguf(path)
    config = AutoConfig.from_pretrained(folder)
    want = dict(iterate_weights(folder))
    got = iterate_gguf_weights(
        path, config.model_type, config.num_attention_heads, config.num_key_value_heads
    )
    seen = set()
    formats = set()
    for name, tensor in got:
        assert name in want, name
        if isinstance(tensor, QuantizedTensor):
            formats.add(tensor.qtype)
            values = reference.dequantize(tensor.data, tensor.qtype)
        else:
            values = tensor
        assert values.dtype == torch.float32
        torch.testing.assert_close(values, want[name], rtol=0, atol=1e-6, msg=name)
        seen.add(name)
    assert seen == set(want)
    assert formats == {"q4_1", "q8_0"}
