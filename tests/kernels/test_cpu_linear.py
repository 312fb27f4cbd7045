"""The C++ skinny GEMM (`xllm.ops.cpu.linear`) against the torch reference.

Every test runs once per instruction-set variant this CPU supports (the `cpu_isa` fixture).
"""

import functools

import pytest
import torch

from xllm import ops
from xllm.ops import reference

try:
    from xllm.ops import cpu
    from xllm.ops.cpu import _C
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = _C = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

# float32, rtol 1e-4 / atol 1e-4: weights are scaled by 1/sqrt(K) as in a trained layer, so
# outputs are O(1); the kernel sums K products in 16 lanes and a tree, torch (MKL) in
# another order, and both differ from the exact sum by ~1e-6.
TOL = {"rtol": 1e-4, "atol": 1e-4}

ROWS = [1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 64, 200]
DEPTHS = [8, 64, 576, 1536, 1000]  # 1000: not a multiple of the 16 SIMD lanes
OUTPUTS = [1, 3, 17, 960, 4099]  # 1, 3, 17, 4099: not a multiple of the 4-row W tile
# Depths whose last step is masked, K % 16 = 1, 7, 9, 15, 1, 1, 4 (1 to 15: only that step).
TAIL_DEPTHS = [1, 7, 9, 15, 17, 33, 100]


@functools.cache
def weights(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(k * 10007 + n)
    return torch.randn((n, k), generator=gen) * k**-0.5, torch.randn((n,), generator=gen)


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((m, k), generator=torch.Generator().manual_seed(seed * 131 + m))


@pytest.fixture
def kernel_for_all_rows(monkeypatch):
    """Send every batch size to the C++ kernel (not only those up to LINEAR_MAX_ROWS)."""
    monkeypatch.setattr(cpu, "LINEAR_MAX_ROWS", 1 << 30)


@pytest.mark.parametrize("n", OUTPUTS)
@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("m", ROWS)
def test_matches_reference(kernel_for_all_rows, m, k, n):
    weight, bias = weights(k, n)
    x = activations(m, k)
    for b in (None, bias):
        got = cpu.linear(x, weight, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference.linear(x, weight, b), **TOL)


@pytest.mark.parametrize("n", [1, 5, 16, 19, 1001])
@pytest.mark.parametrize("k", TAIL_DEPTHS)
@pytest.mark.parametrize("m", [1, 2, 4, 7, 17])
def test_masked_depth_tail(kernel_for_all_rows, m, k, n):
    """K not a multiple of the SIMD width: the masked last step, alone or after full ones.

    Rows of x and W lie back to back, so a tail that read past its row would add the next
    row's values (1001 outputs: enough work for several threads).
    """
    weight, bias = weights(k, n)
    x = activations(m, k, seed=2)
    for b in (None, bias):
        torch.testing.assert_close(cpu.linear(x, weight, b), reference.linear(x, weight, b), **TOL)


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 576, 4099), (5, 1000, 17), (33, 8, 3), (64, 1536, 960), (3, 7, 19), (17, 33, 1001)],
)
def test_writes_every_output(m, k, n):
    """Called directly on a NaN-filled output: a skipped element would stay NaN."""
    weight, bias = weights(k, n)
    x = activations(m, k, seed=1)
    for b in (None, bias):
        out = torch.full((m, n), float("nan"))
        _C.linear(
            x.data_ptr(), weight.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(),
            m, n, k,
        )  # fmt: skip
        torch.testing.assert_close(out, reference.linear(x, weight, b), **TOL)


def test_leading_dims_and_dispatch():
    weight, bias = weights(576, 960)
    x = torch.randn((2, 3, 576), generator=torch.Generator().manual_seed(2))
    got = ops.linear(x, weight, bias)  # CPU tensors: the C++ backend
    assert got.shape == (2, 3, 960)
    torch.testing.assert_close(got, reference.linear(x, weight, bias), **TOL)
    one = ops.linear(x[0, 0], weight)  # a single 1-D row
    assert one.shape == (960,)
    torch.testing.assert_close(one, reference.linear(x[0, 0], weight), **TOL)


@pytest.mark.parametrize("k", [64, 576, 1000])  # 1000: not a multiple of 32, F.linear's
@pytest.mark.parametrize("m", [cpu.LINEAR_MAX_ROWS + 1, 517] if cpu else [])
def test_big_batches_take_the_blocked_kernel(m, k):
    weight, bias = weights(k, 17)
    big = activations(m, k)
    for b in (None, bias):
        torch.testing.assert_close(cpu.linear(big, weight, b), reference.linear(big, weight, b),
                                   **TOL)


def test_falls_back_outside_the_kernel():
    """Strided inputs and other dtypes still give F.linear's result."""
    weight, bias = weights(64, 17)
    strided = activations(8, 128)[:, ::2]
    torch.testing.assert_close(
        cpu.linear(strided, weight, bias), reference.linear(strided, weight, bias), **TOL
    )
    wt = torch.randn((64, 17)).t()  # a transposed (non-contiguous) weight
    x = activations(4, 64)
    torch.testing.assert_close(cpu.linear(x, wt), reference.linear(x, wt), **TOL)
    x64, w64 = x.double(), weight.double()
    got = cpu.linear(x64, w64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.linear(x64, w64))


def test_shape_mismatch_raises():
    weight, _ = weights(64, 17)
    with pytest.raises(RuntimeError):
        cpu.linear(activations(2, 63), weight)


@pytest.mark.parametrize("k", [64, 576, 1000])  # 1000: not a multiple of 32, float32 always
@pytest.mark.parametrize("m", [1, 5, 64, 200])
def test_bf16_products(m, k):
    """Float rows with bfloat16 products allowed: the blocked kernel's choice
    (`_C.bf16_products`), the reference's rounded product where it takes them."""
    weight, bias = weights(k, 17)
    x = activations(m, k)
    bf16 = k % 32 == 0 and _C.bf16_products(m)
    want = reference.linear(x, weight, bias, bf16_products=bf16)
    torch.testing.assert_close(cpu.linear(x, weight, bias, bf16_products=True), want, **TOL)
    if bf16:
        assert not torch.allclose(want, reference.linear(x, weight, bias), **TOL)
