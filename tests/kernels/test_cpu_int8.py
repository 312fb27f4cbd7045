"""The C++ int8-product linear (`xllm.ops.cpu.int8_linear`, --matmul-precision low) against the
torch reference, once per instruction-set variant this CPU runs (the `cpu_isa` fixture).

The oracle: `reference.int8_linear` rounds x per block of 32 (`reference.int8_rows`), takes W
from the packed rows (`reference.unpack_int8`, itself checked against GGUF's dequantization
in test_quant_reference.py) and sums in float64. The kernel's integer sums are exact; only its
float32 scaling and the order of the blocks' sums differ, hence 1e-4.
"""

import pytest
import torch
from quant_data import random_rows

from xllm import ops
from xllm.ops import reference
from xllm.ops.quant import INT8_FORMATS, QuantizedTensor, pack_int8

try:
    from xllm.ops import cpu
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

TOL = {"rtol": 1e-4, "atol": 1e-4}
# Around the 4-row register block and the 2-panel (32-row) tile; from 29 rows of 576 values
# (2^14), x is rounded on both threads.
ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 64, 130, 520]
OUTPUTS = [1, 3, 16, 17, 33, 100]
DEPTHS = [32, 96, 576]


def case(qtype: str, m: int, n: int, k: int):
    gen = torch.Generator().manual_seed(INT8_FORMATS.index(qtype) * 1_000_003 + m * 10007
                                        + n * 101 + k)
    packed = pack_int8(QuantizedTensor(qtype, random_rows(qtype, n, k, gen)))
    return torch.randn(m, k, generator=gen) / k**0.5, packed, torch.randn(n, generator=gen)


@pytest.mark.parametrize("qtype", INT8_FORMATS)
@pytest.mark.parametrize("m", ROWS)
def test_int8_linear_matches_reference(qtype, m):
    for k in DEPTHS if m < 130 else DEPTHS[-1:]:
        for n in OUTPUTS:
            x, packed, bias = case(qtype, m, n, k)
            for b in (None, bias):
                got = cpu.int8_linear(x, packed, b)
                assert got.shape == (m, n) and got.dtype == torch.float32
                torch.testing.assert_close(got, reference.int8_linear(x, packed, b), **TOL)


@pytest.mark.parametrize("qtype", INT8_FORMATS)
def test_every_variant_gives_the_same_floats(qtype, cpu_isa):
    """The portable loop sums and scales in the vectorized tile's order: equal floats."""
    x, packed, bias = case(qtype, 37, 45, 576)
    got = cpu.int8_linear(x, packed, bias)
    cpu._C.set_isa(cpu._C.supported_isas()[0])  # the baseline (the fixture restores the isa)
    assert torch.equal(got, cpu.int8_linear(x, packed, bias))


@pytest.mark.parametrize("qtype", INT8_FORMATS)
def test_int8_products_differ_from_float32(qtype):
    """x is rounded: the product is the reference's, not W's float32 product with x."""
    x, packed, _ = case(qtype, 8, 33, 576)
    exact = torch.nn.functional.linear(x, reference.unpack_int8(packed))
    got = ops.int8_linear(x, packed)
    assert not torch.allclose(got, exact, **TOL)
    torch.testing.assert_close(got, exact, rtol=0.05, atol=0.05)  # rounding's reach


def test_batch_dims_and_zero_rows():
    x, packed, bias = case("q4_1", 6, 40, 96)
    x[2] = 0.0  # blocks of zeros: scale 0, the bias alone
    got = cpu.int8_linear(x.view(2, 3, 96), packed, bias)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got.view(6, 40), reference.int8_linear(x, packed, bias), **TOL)
    assert torch.equal(got[0, 2], bias)
    assert cpu.int8_linear(x[:0], packed).shape == (0, 40)


def test_bad_input():
    x, packed, bias = case("q8_0", 2, 20, 64)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        cpu.int8_linear(torch.randn(2, 32), packed)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        cpu.int8_linear(x, packed, bias[:5])
    with pytest.raises(TypeError, match="float32"):
        cpu.int8_linear(x.double(), packed)
    bad = type(packed)("q8_0", packed.data[:, :1], packed.n, packed.k)
    with pytest.raises(ValueError, match="pack_int8"):
        cpu.int8_linear(x, bad)
    with pytest.raises(ValueError, match="pack_int8"):
        cpu.int8_linear(x, type(packed)("q4_k", packed.data, packed.n, packed.k))


def test_int8_products_fast_where_the_cpu_has_vnni(cpu_isa):
    with open("/proc/cpuinfo") as f:
        vnni = "avx512_vnni" in f.read().split()
    assert cpu._C.int8_products_fast() == (cpu_isa == "avx512" and vnni)
