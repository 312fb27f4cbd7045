"""Random quantized rows for the quantized-weight kernel tests (Triton and C++ alike)."""

import torch

from xllm.ops.quant import quant_format

# Byte offsets in a block of each float16 scale field, with the field's typical size: about
# 1 / (the largest |q| it multiplies), so that the weights stay of order 1.
F16_FIELDS = {
    "q8_0": {0: 1 / 127},
    "q4_0": {0: 1 / 8},
    "q4_1": {0: 1 / 15, 2: 1.0},
    "q4_k": {0: 1 / (63 * 15), 2: 1 / 63},
    "q6_k": {208: 1 / (127 * 32)},
}


def random_rows(qtype: str, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Quantized rows uint8 [n, row_bytes] of a random weight [n, k] in `qtype`'s layout.

    All bytes are random, except the scale fields (f16 d, dmin, m; int8's f32 row scale),
    which hold small finite random values (normal, of either sign), so that no weight is
    NaN or infinite.
    """
    fmt = quant_format(qtype)
    data = torch.randint(0, 256, (n, fmt.row_bytes(k)), dtype=torch.uint8, generator=generator)
    if qtype == "int8":
        scale = torch.randn(n, 1, generator=generator).abs() / 127
        data[:, :4] = scale.view(torch.uint8)
        return data
    blocks = data.view(n, k // fmt.block, fmt.block_bytes)
    for offset, size in F16_FIELDS[qtype].items():
        values = (torch.randn(n, k // fmt.block, generator=generator) * size).half()
        blocks[..., offset : offset + 2] = values.view(torch.uint8).view(n, -1, 2)
    return data
