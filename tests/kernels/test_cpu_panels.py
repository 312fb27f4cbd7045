"""The C++ float32 GEMM on weights packed in panels (`xllm.ops.cpu.panel_linear`) against the
torch reference, once per instruction-set variant this CPU runs (the `cpu_isa` fixture).

The oracle: W unpacked from its panels (`reference.panel_linear`), whose packing is checked
against the rows it came from, multiplied by torch in float64. The kernel sums each output in
one float32 chain over k, hence a tolerance that grows with K.
"""

import pytest
import torch

from xllm.ops import reference
from xllm.ops.panels import PANEL, pack_panels, unpack_panels

try:
    from xllm.ops import cpu
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

# Around the register blocks (4, 6 or 8 rows by variant), the 64-row chunks of x and the
# 32-row panels.
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 63, 64, 65, 130]
OUTPUTS = [1, 7, 31, 32, 33, 100, 160]
DEPTHS = [1, 17, 64, 576]


def case(m: int, n: int, k: int):
    gen = torch.Generator().manual_seed(m * 10007 + n * 101 + k)
    w = torch.randn(n, k, generator=gen)
    return torch.randn(m, k, generator=gen) / k**0.5, w, torch.randn(n, generator=gen)


def exact(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y if bias is None else y + bias.double()).float()


def test_packing_keeps_the_weights():
    w = torch.randn(45, 20)
    panels = pack_panels(w)
    assert panels.data.shape == (2, 20, PANEL) and panels.shape == (45, 20)
    assert torch.equal(panels.data[1, 3, 4], w[PANEL + 4, 3])
    assert torch.equal(panels.data[1, :, 45 - PANEL:], torch.zeros(20, 2 * PANEL - 45))
    assert torch.equal(unpack_panels(panels), w)
    with pytest.raises(ValueError, match="float32"):
        pack_panels(w.double())


@pytest.mark.parametrize("m", ROWS)
def test_panel_linear_matches_reference(m):
    for k in DEPTHS:
        for n in OUTPUTS:
            x, w, bias = case(m, n, k)
            panels = pack_panels(w)
            for b in (None, bias):
                got = cpu.panel_linear(x, panels, b)
                assert got.shape == (m, n) and got.dtype == torch.float32
                torch.testing.assert_close(got, exact(x, w, b), rtol=1e-5, atol=2e-6 * k**0.5)
                torch.testing.assert_close(got, reference.panel_linear(x, panels, b),
                                           rtol=1e-5, atol=2e-6 * k**0.5)


def test_avx2_and_avx512_give_the_same_floats(cpu_isa):
    """Both sum each output in one fused multiply-add chain over k: equal floats."""
    fused = [isa for isa in cpu._C.supported_isas() if isa in ("avx2", "avx512")]
    if cpu_isa not in fused:
        pytest.skip("the portable variant multiplies and adds apart")
    if len(fused) < 2:
        pytest.skip("needs a CPU with AVX2 and AVX-512")
    x, w, bias = case(37, 45, 576)
    panels = pack_panels(w)
    got = cpu.panel_linear(x, panels, bias)
    cpu._C.set_isa(fused[0] if cpu_isa == fused[1] else fused[1])  # the fixture restores it
    assert torch.equal(got, cpu.panel_linear(x, panels, bias))


def test_batch_dims_zero_rows_and_empty_k():
    x, w, bias = case(6, 40, 96)
    panels = pack_panels(w)
    got = cpu.panel_linear(x.view(2, 3, 96), panels, bias)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got.view(6, 40), exact(x, w, bias), rtol=1e-5, atol=2e-5)
    assert cpu.panel_linear(x[:0], panels).shape == (0, 40)
    empty = pack_panels(torch.empty(40, 0))
    assert torch.equal(cpu.panel_linear(torch.empty(3, 0), empty, bias), bias.expand(3, 40))


def test_bad_input():
    x, w, bias = case(2, 20, 64)
    panels = pack_panels(w)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        cpu.panel_linear(torch.randn(2, 32), panels)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        cpu.panel_linear(x, panels, bias[:5])
    with pytest.raises(TypeError, match="float32"):
        cpu.panel_linear(x.double(), panels)
    bad = type(panels)(panels.data[:, :10], panels.n, panels.k)
    with pytest.raises(ValueError, match="pack_panels"):
        cpu.panel_linear(x, bad)
    with pytest.raises(ValueError, match="pack_panels"):
        cpu.panel_linear(x, type(panels)(panels.data.double(), panels.n, panels.k))
