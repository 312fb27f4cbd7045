"""The C++ quantized-weight kernels (`xllm.ops.cpu.quant_linear`, `dequantize`) against the
torch reference, once per instruction-set variant this CPU runs (the `cpu_isa` fixture).

Shapes cover N not a multiple of the 4-row tile, M from 1 to 128 (below, at and above the
register block of x rows, where the kernel switches to its unpacked-tile buffer), and K of
one and several blocks. float32 tolerance 1e-4: the weights are equal (the kernel unpacks the
same values), only the order of the sums differs.
"""

import os
import sys

import pytest
import torch

from xllm import ops
from xllm.ops import reference
from xllm.ops.quant import FORMATS, QuantizedTensor, quantize_int8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quant_data
from quant_data import random_rows  # noqa: E402

try:
    from xllm.ops import cpu  # noqa: E402
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

TOL = {"rtol": 1e-4, "atol": 1e-4}
QTYPES = sorted(FORMATS)
DEPTHS = {"q4_k": [256, 768], "q6_k": [256, 768]}  # others: one block to many
ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 64, 128]
OUTPUTS = [1, 3, 7, 33, 100]


def depths(qtype: str) -> list[int]:
    return DEPTHS.get(qtype, [32, 96, 576])


def case(qtype: str, m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(QTYPES.index(qtype) * 1_000_003 + m * 10007 + n * 101 + k)
    data = random_rows(qtype, n, k, gen)
    return torch.randn(m, k, generator=gen) / k**0.5, data, torch.randn(n, generator=gen)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_quant_linear_matches_reference(qtype, m):
    for k in depths(qtype):
        for n in OUTPUTS:
            x, data, bias = case(qtype, m, n, k)
            for b in (None, bias):
                got = cpu.quant_linear(x, data, qtype, b)
                assert got.shape == (m, n) and got.dtype == torch.float32
                torch.testing.assert_close(got, reference.quant_linear(x, data, qtype, b), **TOL)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quant_linear_batch_dims_and_large_m(qtype):
    """x [..., K] keeps its leading dims; many rows run in passes of rows."""
    k = depths(qtype)[-1]
    x, data, bias = case(qtype, 1200, 9, k)  # over one pass of rows for K = 576
    want = reference.quant_linear(x, data, qtype, bias)
    torch.testing.assert_close(cpu.quant_linear(x, data, qtype, bias), want, **TOL)
    x3 = x[:30].view(5, 6, k)
    torch.testing.assert_close(cpu.quant_linear(x3, data, qtype), want[:30].view(5, 6, 9)
                               - bias, **TOL)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_reference_exactly(qtype):
    k = depths(qtype)[-1]
    data = random_rows(qtype, 37, k, torch.Generator().manual_seed(1))
    assert torch.equal(cpu.dequantize(data, qtype), reference.dequantize(data, qtype))
    rows = torch.tensor([36, 0, 5, 5, 17])
    for index in (rows, rows.to(torch.int32)):
        assert torch.equal(cpu.dequantize(data, qtype, index),
                           reference.dequantize(data, qtype, rows))


def test_dispatch_goes_to_cpp_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu._C, "quant_linear", lambda *a: calls.append(a))
    x, data, _ = case("q4_1", 1, 4, 32)
    ops.quant_linear(x, data, "q4_1")
    assert len(calls) == 1


def test_int8_of_a_float_weight():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 96, generator=gen)
    q = quantize_int8(weight)
    x = torch.randn(5, 96, generator=gen)
    got = cpu.quant_linear(x, q.data, "int8")
    torch.testing.assert_close(got, reference.quant_linear(x, q.data, "int8"), **TOL)
    # and close to the float product: at most half a step per weight
    assert (got - x @ weight.T).abs().max() <= (x.abs().sum(1).max() * weight.abs().max() / 254)


@pytest.mark.parametrize(
    "args, error",
    [
        (lambda x, d: (x, d.float(), "q4_1"), TypeError),  # not uint8
        (lambda x, d: (x, d[:, :-1].contiguous(), "q4_1"), ValueError),  # not whole blocks
        (lambda x, d: (x[:, :32], d, "q4_1"), ValueError),  # x's K differs
        (lambda x, d: (x, d, "q5_0"), ValueError),  # unknown format
        (lambda x, d: (x.double(), d, "q4_1"), TypeError),  # not float32
    ],
)
def test_bad_input(args, error):
    x, data, _ = case("q4_1", 2, 4, 64)
    with pytest.raises(error):
        cpu.quant_linear(*args(x, data))


def test_dequantize_checks_rows():
    data = random_rows("q8_0", 4, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="outside"):
        cpu.dequantize(data, "q8_0", torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="outside"):
        cpu.dequantize(data, "q8_0", torch.tensor([-1]))
    with pytest.raises(TypeError):
        cpu.dequantize(data, "q8_0", torch.tensor([0.0]))


def test_quantized_tensor_shape():
    data = random_rows("q6_k", 3, 512, torch.Generator().manual_seed(0))
    assert QuantizedTensor("q6_k", data).shape == (3, 512)


@pytest.mark.parametrize("qtype", QTYPES)
# 520 rows of 576 (or 512) take the conversion of x to bfloat16 on both threads (2^18 values)
# and two passes over W (512 KiB of bfloat16 x rows per pass).
@pytest.mark.parametrize("m", [1, 4, 5, 16, 17, 64, 130, 520])
def test_bf16_products(qtype, m):
    """Allowed bfloat16 products: where the kernel takes them (`_C.bf16_products`), the
    reference's product of x and W rounded to bfloat16 (only the order of the float32 sums
    differs); elsewhere the float32 product."""
    k = depths(qtype)[-1]
    x, data, bias = case(qtype, m, 33, k)
    rounded = reference.quant_linear(x, data, qtype, bias, bf16_products=True)
    exact = reference.quant_linear(x, data, qtype, bias)
    assert not torch.allclose(rounded, exact, **TOL)  # the two products are told apart
    want = rounded if cpu._C.bf16_products(m) else exact
    torch.testing.assert_close(cpu.quant_linear(x, data, qtype, bias, True), want, **TOL)
    torch.testing.assert_close(ops.quant_linear(x, data, qtype, None, True), want - bias, **TOL)


def test_bf16_products_run_where_the_cpu_has_them(cpu_isa):
    """AVX-512 BF16's dot products serve batches past one register block of rows; other
    variants and CPUs, and single rows (bound by unpacking, not multiplying), stay float32."""
    with open("/proc/cpuinfo") as f:
        bf16_cpu = "avx512_bf16" in f.read().split()
    assert cpu._C.bf16_products(64) == (cpu_isa == "avx512" and bf16_cpu)
    assert not cpu._C.bf16_products(1)
