"""A decoder's weights and shape as the one-call decoder-stack kernel takes them
(`xllm.ops.decoder_stack`); the model fills them from its modules."""

from typing import NamedTuple

import torch

from xllm.ops.panels import F32Panels
from xllm.ops.quant import Int8Packed


class LinearWeights(NamedTuple):
    # float rows [N, K], quantized rows [N, row_bytes] of qtype, those rows packed for int8
    # products (`xllm.ops.quant.pack_int8`), or float32 rows packed in panels (`xllm.ops.panels`)
    weight: torch.Tensor | Int8Packed | F32Panels
    qtype: str | None  # None: float rows
    bias: torch.Tensor | None  # [N]
    in_features: int  # K
    bf16_products: bool = False  # allowed where they pay (see `ops.linear`)


class LayerWeights(NamedTuple):
    input_norm: torch.Tensor  # [hidden]
    qkv: LinearWeights  # q, k and v rows stacked
    o: LinearWeights
    post_norm: torch.Tensor  # [hidden]
    gate_up: LinearWeights  # gate and up rows stacked
    down: LinearWeights


class DecoderShape(NamedTuple):
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    eps: float  # the RMSNorms'
    scale: float  # the attention's
