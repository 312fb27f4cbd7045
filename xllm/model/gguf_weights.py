"""Reads a GGUF file's weights under their Hugging Face names, keeping quantized ones quantized.

Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors become `QuantizedTensor`s whose rows are the file's
bytes (`xllm.ops.quant` lays them out exactly as GGUF does); F32, F16 and BF16 tensors, and
any other quantized format, become float32 tensors. Shapes are Hugging Face's: [N, K] for a
matrix, which GGUF lists as [K, N].

llama.cpp's converter permutes the rows of attn_q and attn_k of "llama" models (within each
head it interleaves the two rotary halves); as transformers' GGUF loader does, the rows are
put back here, on the quantized bytes too, since rows are independent.
"""

import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from xllm.ops.quant import QuantizedTensor, quant_format

logger = logging.getLogger(__name__)

# GGUF's quantized types served natively, by xllm's format name.
NATIVE_QTYPES = {
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
    GGMLQuantizationType.Q4_1: "q4_1",
    GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q6_K: "q6_k",
}
FLOAT_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.F64,
)

# GGUF names outside the blocks, and within block N ("blk.N.<part>.weight" / ".bias").
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Hugging Face model types whose attn_q / attn_k rows llama.cpp permutes (Mistral files carry
# the GGUF architecture "llama"); a file whose architecture is "llama" is permuted whatever
# model_type says, as transformers keys its reverse permutation on the GGUF architecture.
PERMUTED_MODEL_TYPES = ("llama", "mistral")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None for one without (rope_freqs)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in BLOCK_PARTS:
        return None
    return f"model.layers.{match[1]}.{BLOCK_PARTS[match[2]]}.{match[3]}"


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation of a [rows, ...] tensor: new = old[idx].

    transformers' `_reverse_permute_weights`: w.reshape(n_head, dim, 2, ...).swapaxes(2, 1).
    """
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows are not {n_head} heads of an even size")
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(2, 1).reshape(rows)


def _field_str(reader: GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def gguf_quant_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type (e.g. {"Q4_1": 210, "F32": 61}) the file holds."""
    return _type_counts(GGUFReader(path))


def _type_counts(reader: GGUFReader) -> dict[str, int]:
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())


def iterate_gguf_weights(
    path: Path, model_type: str, num_heads: int, num_kv_heads: int
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (Hugging Face name, tensor) for every model tensor of a GGUF file.

    Matrices of a native quantized type come as QuantizedTensor (uint8 [N, row_bytes], copied
    out of the memory map); every other tensor as a float32 tensor of the Hugging Face shape.
    Tensors without a Hugging Face name (rope_freqs) are skipped.
    """
    reader = GGUFReader(path)
    logger.info("%s: tensors by format: %s", Path(path).name, _type_counts(reader))
    arch = _field_str(reader, "general.architecture")
    permute = arch == "llama" or model_type in PERMUTED_MODEL_TYPES
    heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    native = {t.name for t in reader.tensors if _native_qtype(t) is not None}
    dequantized = [
        t.name
        for t in reader.tensors
        if t.tensor_type not in FLOAT_TYPES and t.name not in native and hf_name(t.name)
    ]
    if dequantized:
        logger.info(
            "%s: %d tensors of formats without a native kernel load as float32: %s",
            Path(path).name,
            len(dequantized),
            ", ".join(dequantized),
        )
    skipped = [t.name for t in reader.tensors if hf_name(t.name) is None]
    if skipped:
        logger.info("%s: tensors without a Hugging Face name skipped: %s", Path(path).name, skipped)

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        qtype = _native_qtype(t)
        if qtype is not None:
            tensor = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # a copy, not the map
        else:
            tensor = _float_tensor(t)
        match = BLOCK_NAME.fullmatch(t.name)
        if permute and match is not None and match[2] in heads:
            tensor = tensor[torch.from_numpy(unpermute_rows(tensor.shape[0], heads[match[2]]))]
        yield name, (QuantizedTensor(qtype, tensor) if qtype is not None else tensor)


def _native_qtype(t) -> str | None:
    """xllm's format name of a tensor kept quantized: a native type, and a matrix."""
    qtype = NATIVE_QTYPES.get(t.tensor_type)
    if qtype is None or len(t.shape) != 2 or t.data.ndim != 2:
        return None
    if quant_format(qtype).row_bytes(int(t.shape[0])) != t.data.shape[1]:
        raise ValueError(f"{t.name}: {t.data.shape[1]} bytes are not a {qtype} row of {t.shape[0]}")
    return qtype


def _float_tensor(t) -> torch.Tensor:
    """float32 copy of a tensor, dequantized if need be, in the Hugging Face shape."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.F32:
        data = np.array(t.data, dtype=np.float32)
    elif t.tensor_type in (GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        data = np.asarray(t.data).astype(np.float32)
    else:  # BF16 and other quantized types
        data = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(data).reshape(shape))
