"""The quantized formats' reference (`reference.dequantize`) against the gguf package, and the
test data (`quant_data.random_rows`) and `quant.quantize_int8` it is used with; the packing for
int8 products (`quant.pack_int8`) and the reference's rounding of x to int8.

gguf's numpy dequantization is an independent reading of ggml's block layouts: on the same
bytes both must give the same float32 weights, bit for bit.
"""

import os
import sys

import numpy as np
import pytest
import torch

from xllm.ops import reference as ref
from xllm.ops.quant import (
    FORMATS,
    INT8_FORMATS,
    QuantizedTensor,
    int8_block_bytes,
    pack_int8,
    quant_format,
    quantize_int8,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quant_data
from quant_data import random_rows  # noqa: E402

gguf = pytest.importorskip("gguf")

GGUF_TYPES = {
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q4_k": "Q4_K",
    "q6_k": "Q6_K",
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_random_rows_layout(qtype):
    fmt = quant_format(qtype)
    k = 2 * fmt.block
    data = random_rows(qtype, 5, k, _gen(0))
    assert data.dtype == torch.uint8 and data.shape == (5, fmt.row_bytes(k))
    weights = ref.dequantize(data, qtype)
    assert torch.isfinite(weights).all()
    assert 0.01 < weights.abs().max() < 100  # of order 1
    assert not torch.equal(data, random_rows(qtype, 5, k, _gen(1)))
    assert torch.equal(data, random_rows(qtype, 5, k, _gen(0)))


@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_reference_matches_gguf(qtype):
    fmt = quant_format(qtype)
    k = 3 * max(fmt.block, 256)
    data = random_rows(qtype, 7, k, _gen(2))
    expected = gguf.quants.dequantize(
        data.numpy(), getattr(gguf.GGMLQuantizationType, GGUF_TYPES[qtype])
    )
    assert expected.dtype == np.float32 and expected.shape == (7, k)
    got = ref.dequantize(data, qtype)
    assert torch.equal(got, torch.from_numpy(expected))
    rows = torch.tensor([6, 0, 6])
    assert torch.equal(ref.dequantize(data, qtype, rows), torch.from_numpy(expected)[rows])


def test_reference_matches_gguf_quantized_weights():
    # Bytes that gguf's own quantizer wrote, not only random ones.
    weight = torch.randn(4, 512, generator=_gen(3)).numpy()
    for qtype in ("q8_0", "q4_0", "q4_1"):
        gtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[qtype])
        data = gguf.quants.quantize(weight, gtype)
        expected = torch.from_numpy(gguf.quants.dequantize(data, gtype))
        assert torch.equal(ref.dequantize(torch.from_numpy(data), qtype), expected)


def test_quantize_int8():
    weight = torch.randn(9, 96, generator=_gen(4)) * torch.logspace(-3, 2, 9)[:, None]
    weight[4] = 0.0  # an all-zero row
    q = quantize_int8(weight)
    assert q.qtype == "int8" and q.shape == (9, 96)
    assert q.data.dtype == torch.uint8 and q.data.shape == (9, FORMATS["int8"].row_bytes(96))
    scale = q.data[:, :4].contiguous().view(torch.float32).squeeze(1)
    torch.testing.assert_close(scale[[0, 8]], weight[[0, 8]].abs().amax(1) / 127)
    values = q.data[:, 4:].view(torch.int8)
    assert values.abs().max() <= 127
    restored = ref.dequantize(q.data, "int8")
    error = (restored - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(restored[4], torch.zeros(96))


def test_quantize_int8_refuses_k_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int8(torch.randn(2, 48))


@pytest.mark.parametrize("qtype", INT8_FORMATS)
@pytest.mark.parametrize("n", [1, 16, 17, 40])
def test_int8_packing_keeps_the_weights(qtype, n):
    """Packed for int8 products, the rows still give GGUF's weights, bit for bit."""
    data = random_rows(qtype, n, 96, _gen(n))
    packed = pack_int8(QuantizedTensor(qtype, data))
    assert packed.shape == (n, 96)
    assert packed.data.shape == (-(-n // 16), 3, int8_block_bytes(packed.qtype))
    assert torch.equal(ref.unpack_int8(packed), ref.dequantize(data, qtype))


def test_int8_rows_pack_as_q8_0_blocks_of_their_scale():
    data = random_rows("int8", 5, 64, _gen(3))
    packed = pack_int8(QuantizedTensor("int8", data))
    assert packed.qtype == "q8_0"
    assert torch.equal(ref.unpack_int8(packed), ref.dequantize(data, "int8"))


def test_int8_packing_refuses_other_formats():
    with pytest.raises(ValueError, match="q8_0, q4_0, q4_1, int8 weights, not q4_k"):
        pack_int8(QuantizedTensor("q4_k", random_rows("q4_k", 2, 256, _gen(0))))


def test_int8_rows():
    """x rounded per block of 32: integers within 127, 127 at each block's largest |x|, each
    within half a step of x / d; a block of zeros gives zeros with scale 0."""
    x = torch.randn(3, 96, generator=_gen(1)) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    x[1, 32:64] = 0.0
    q, d = ref.int8_rows(x)
    assert q.shape == x.shape and d.shape == (3, 3)
    blocks, qb = x.view(3, 3, 32), q.view(3, 3, 32)
    assert torch.equal(q, q.round()) and q.abs().max() <= 127
    assert d[1, 1] == 0 and not qb[1, 1].any()
    live = d > 0
    assert torch.equal(qb.abs().amax(-1)[live], torch.full_like(d[live], 127.0))
    err = (blocks - qb * d[..., None]).abs()
    assert (err <= d[..., None] / 2 * (1 + 1e-5)).all()
