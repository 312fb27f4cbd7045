"""Triton quantized-weight kernels (`quant_linear`, `dequantize`) against the torch reference.

Compiled on a CUDA machine; on the CPU they run under TRITON_INTERPRET=1, which this module
sets when there is no GPU. The weights are random rows of each format (`quant_data`):
N not a multiple of the kernels' row tiles, M on both sides of the tl.dot threshold (16).
Tolerances: float32 1e-4 (absolute and relative); float16 1e-2 and bfloat16 2e-2 (CUDA only)
on top of the TF32 rounding of the weights that tl.dot does with half activations;
dequantize matches the reference within 1e-6 (exactly when interpreted).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers here
from quant_data import random_rows  # noqa: E402
from triton_backend import CUDA, DEVICE, TOL  # noqa: E402  (sets TRITON_INTERPRET)

from xllm import ops  # noqa: E402
from xllm.ops import cuda as tri  # noqa: E402
from xllm.ops import reference as ref  # noqa: E402
from xllm.ops.quant import FORMATS  # noqa: E402

QTYPES = list(FORMATS)
K_SIZES = {q: [256, 512] if FORMATS[q].block == 256 else [32, 96, 576] for q in QTYPES}
N_SIZES = [1, 7, 33, 100]
M_SIZES = [1, 3, 16, 17, 64, 128]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases(qtype: str) -> list[tuple[int, int, int, bool]]:
    """(n, k, m, bias) cases of one format: every N, K, M and bias choice at least once.

    A sample of the product (the interpreter is slow), shifted per format so that the
    formats together cover more combinations.
    """
    shift = QTYPES.index(qtype)
    ks = K_SIZES[qtype]
    return [
        (
            N_SIZES[(i + shift) % len(N_SIZES)],
            ks[(i + i // 4 + shift) % len(ks)],
            M_SIZES[(i + 2 * shift) % len(M_SIZES)],
            (i // 2 + shift) % 2 == 0,
        )
        for i in range(8)
    ]


def _rows(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    return random_rows(qtype, n, k, _gen(seed)).to(DEVICE)


def _check_linear(x, data, qtype, bias=None):
    got = tri.quant_linear(x, data, qtype, bias)
    assert got.dtype == x.dtype
    assert got.shape == (*x.shape[:-1], data.shape[0])
    expected = ref.quant_linear(x.float(), data, qtype, None if bias is None else bias.float())
    tol = TOL[x.dtype]
    if x.dtype == torch.float32:
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
        return
    # Half activations multiply in TF32 (tl.dot): each weight is rounded to 10 mantissa bits,
    # an error of at most 2^-11 of |x_i * w_i| per term, so bound by |x| @ |W|^T on top of
    # the output's own rounding.
    weights = ref.dequantize(data, qtype).float().abs()
    bound = 2**-11 * (x.float().abs() @ weights.T) + tol * (1 + expected.abs())
    excess = (got.float() - expected).abs() - bound
    assert excess.max() <= 0, f"error over the TF32 bound by {excess.max():.3g}"


# ---------------------------------------------------------------- quant_linear


@pytest.mark.parametrize(
    "qtype,n,k,m,with_bias",
    [(q, *case) for q in QTYPES for case in _cases(q)],
)
def test_quant_linear(qtype, n, k, m, with_bias):
    gen = _gen(n * 1000 + m)
    data = _rows(qtype, n, k, seed=k + n)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DEVICE) if with_bias else None
    _check_linear(x, data, qtype, bias)


@pytest.mark.skipif(not CUDA, reason="half-precision activations are checked on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 100])
def test_quant_linear_half(qtype, dtype, m):
    k = K_SIZES[qtype][-1]
    data = _rows(qtype, 100, k, seed=m)
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE, dtype)
    bias = torch.randn(100, generator=_gen(m + 1)).to(DEVICE, dtype)
    _check_linear(x, data, qtype, bias)


def test_quant_linear_batch_dims_and_strides():
    # x [2, 3, K], a column slice of a wider tensor (rows not contiguous).
    data = _rows("q4_k", 7, 256, seed=1)
    wide = torch.randn(2, 3, 300, generator=_gen(1)).to(DEVICE)
    x = wide[..., 10:266]
    _check_linear(x, data, "q4_k")
    # A contiguous view of a strided x (last dim stride != 1) is taken.
    xt = torch.randn(32, 20, generator=_gen(2)).to(DEVICE).t()  # [20, 32], stride (1, 20)
    bias = torch.randn(10, generator=_gen(3)).to(DEVICE)[::2]  # a strided bias
    _check_linear(xt, _rows("q8_0", 5, 32, seed=2), "q8_0", bias)


def test_quant_linear_empty():
    data = _rows("q8_0", 7, 64, seed=3)
    out = tri.quant_linear(torch.empty(0, 64, device=DEVICE), data, "q8_0")
    assert out.shape == (0, 7)
    out = tri.quant_linear(torch.empty(2, 0, 64, device=DEVICE), data, "q8_0")
    assert out.shape == (2, 0, 7)
    out = tri.quant_linear(torch.randn(3, 64, device=DEVICE), data[:0], "q8_0")
    assert out.shape == (3, 0)


def test_dispatch_reaches_triton():
    data = _rows("q6_k", 33, 256, seed=4)
    x = torch.randn(3, 256, generator=_gen(4)).to(DEVICE)
    with ops.use_backend("triton"):
        got = ops.quant_linear(x, data, "q6_k")
        rows = ops.dequantize(data, "q6_k", torch.tensor([2, 0], device=DEVICE))
    torch.testing.assert_close(got, ref.quant_linear(x, data, "q6_k"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows, ref.dequantize(data, "q6_k")[[2, 0]], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize(qtype):
    k = K_SIZES[qtype][-1]
    data = _rows(qtype, 33, k, seed=5)
    got = tri.dequantize(data, qtype)
    assert got.dtype == torch.float32 and got.shape == (33, k)
    torch.testing.assert_close(got, ref.dequantize(data, qtype), atol=1e-6, rtol=1e-6)
    for rows in ([32, 0, 5, 5], [17]):  # repeats, out of order; a single row
        for ids in (torch.int64, torch.int32):
            index = torch.tensor(rows, dtype=ids, device=DEVICE)
            got = tri.dequantize(data, qtype, index)
            expected = ref.dequantize(data, qtype, index)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_dequantize_empty_rows():
    data = _rows("q4_0", 4, 32, seed=6)
    out = tri.dequantize(data, "q4_0", torch.empty(0, dtype=torch.long, device=DEVICE))
    assert out.shape == (0, 32) and out.dtype == torch.float32


# ---------------------------------------------------------------- bad input


def test_bad_input():
    data = _rows("q8_0", 4, 64, seed=7)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(TypeError, match="uint8"):
        tri.quant_linear(x, data.view(torch.int8), "q8_0")
    with pytest.raises(TypeError, match="uint8"):
        tri.dequantize(data.view(torch.int8), "q8_0")
    with pytest.raises(ValueError, match="whole q8_0 blocks"):
        tri.quant_linear(x, data[:, :35], "q8_0")
    with pytest.raises(ValueError, match="whole q8_0 blocks"):
        tri.dequantize(data[:, :35], "q8_0")
    with pytest.raises(ValueError, match="whole int8 blocks"):
        tri.dequantize(data[:, :2], "int8")  # shorter than the header
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        tri.quant_linear(torch.randn(2, 32, device=DEVICE), data, "q8_0")
    with pytest.raises(ValueError, match="unknown quantized format"):
        tri.quant_linear(x, data, "q5_0")
    with pytest.raises(ValueError, match="N, row_bytes"):
        tri.quant_linear(x, data[0], "q8_0")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tri.quant_linear(x.long(), data, "q8_0")
    with pytest.raises(ValueError, match="bias"):
        tri.quant_linear(x, data, "q8_0", torch.zeros(5, device=DEVICE))
    with pytest.raises(TypeError, match="rows"):
        tri.dequantize(data, "q8_0", torch.tensor([0.0], device=DEVICE))
    with pytest.raises(ValueError, match="rows"):
        tri.dequantize(data, "q8_0", torch.zeros(1, 1, dtype=torch.long, device=DEVICE))


# ---------------------------------------------------------------- compiled for sm_90, without a GPU

AOT_SCRIPT = r"""
import sys
import torch
import xllm.ops.cuda as tri
import triton_aot as aot
from quant_data import random_rows

assert not tri.INTERPRETED
names = ("quant_linear_kernel", "dequantize_kernel")
recorders = aot.record(tri, names)

gen = torch.Generator().manual_seed(0)
for qtype in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8"):
    data = random_rows(qtype, 64, 4096, gen)
    tri.quant_linear(torch.zeros(1, 4096, dtype=torch.bfloat16), data, qtype)  # decode
    tri.quant_linear(torch.zeros(256, 4096, dtype=torch.float16), data, qtype, torch.zeros(64))
    tri.quant_linear(torch.zeros(32, 4096), data, qtype)  # float32: ieee tl.dot
    tri.dequantize(data, qtype, torch.tensor([3, 1]))

sys.exit(1 if aot.compile_recorded(recorders, spills_fail=True) else 0)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the tests above compile the kernels for real")
def test_quant_kernels_compile_for_hopper():
    # The interpreter checks neither types nor shape limits of compiled Triton: compile each
    # format's kernels, as the wrappers launch them, for sm_90 (about 15 s cold).
    pytest.importorskip("triton.backends.nvidia")
    import triton_aot

    run = triton_aot.run_script(AOT_SCRIPT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok ") == 24
