"""Triton fused layer kernels (`rms_norm`, `silu_mul`, `rotary_write_kv`) against the reference.

Compiled on a CUDA machine; on the CPU they run under TRITON_INTERPRET=1, which this module
sets when there is no GPU. Inputs are strided views (row stride above the width) unless a
test says otherwise, and the padding between rows must come out untouched. Tolerances:
float32 1e-4 (absolute and relative), float16 1e-2, bfloat16 2e-2 (CUDA only); values
written to the V cache and residual sums must match exactly.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers here
from triton_backend import CUDA, DEVICE, DTYPES, TOL  # noqa: E402  (sets TRITON_INTERPRET)

from xllm import ops  # noqa: E402
from xllm.ops import cuda as tri  # noqa: E402
from xllm.ops import reference as ref  # noqa: E402

PAD = 8  # extra columns of each strided view's rows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(rows: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random [rows, width] view of a [rows, width + PAD] tensor (its `_base`)."""
    return torch.randn(rows, width + PAD, generator=gen).to(DEVICE, dtype)[:, :width]


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = TOL[expected.dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- rms_norm


def _check_rms_norm(x, weight, residual=None, eps=1e-6, **launch):
    """residual: None or a view of a tensor's first columns; the reference runs on a copy."""
    if residual is None:
        out = tri.rms_norm_with(x, weight, eps, **launch)
        assert out.is_contiguous()
        _assert_close(out, ref.rms_norm(x, weight, eps))
        return
    width = residual.shape[1]
    before = residual._base.clone()
    ref_res = before.clone()[:, :width]
    expected, _ = ref.rms_norm(x, weight, eps, ref_res)
    out, returned = tri.rms_norm_with(x, weight, eps, residual, **launch)
    assert returned is residual and out.is_contiguous()
    _assert_close(out, expected)
    assert torch.equal(residual, ref_res)  # the sum, rounded to the residual's dtype
    assert torch.equal(residual._base[:, width:], before[:, width:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [64, 576, 896])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_rms_norm(tokens, hidden, with_residual, dtype):
    gen = _gen(tokens * 1000 + hidden)
    x = _strided(tokens, hidden, dtype, gen)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    residual = _strided(tokens, hidden, dtype, gen) if with_residual else None
    _check_rms_norm(x, weight, residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [576, 900])
def test_rms_norm_two_pass(hidden, with_residual):
    # Rows wider than the chunk: sum of squares first, then the output; 900 ends in a tail.
    gen = _gen(hidden + with_residual)
    x = _strided(5, hidden, torch.float32, gen)
    weight = torch.randn(hidden, generator=gen).to(DEVICE)
    residual = _strided(5, hidden, torch.float32, gen) if with_residual else None
    _check_rms_norm(x, weight, residual, eps=1e-5, block_h=64)


def test_rms_norm_layouts():
    gen = _gen(60)
    weight = torch.randn(96, generator=gen).to(DEVICE)
    x = torch.randn(96, 7, generator=gen).to(DEVICE).t()  # columns not contiguous: copied
    _check_rms_norm(x, weight)
    residual = torch.randn(7, 96, generator=gen).to(DEVICE)  # a dense residual
    expected_res = residual.clone()
    expected, _ = ref.rms_norm(x, weight, 1e-6, expected_res)
    out, returned = tri.rms_norm(x, weight, 1e-6, residual)
    assert returned is residual and torch.equal(residual, expected_res)
    _assert_close(out, expected)
    # The residual as the first rows of a taller tensor: the rows below stay as they were.
    tall = torch.randn(9, 96, generator=gen).to(DEVICE)
    before = tall.clone()
    out, returned = tri.rms_norm(x, weight, 1e-6, tall[:7])
    assert torch.equal(tall[7:], before[7:])
    torch.testing.assert_close(tall[:7], before[:7] + x, atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="half-precision inputs are a CUDA case")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_float32_residual(dtype):
    # A float32 residual stream under half activations: the output follows the residual.
    gen = _gen(61)
    x = _strided(33, 896, dtype, gen)
    weight = torch.randn(896, generator=gen).to(DEVICE, dtype)
    _check_rms_norm(x, weight, _strided(33, 896, torch.float32, gen))


# ---------------------------------------------------------------- silu_mul


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100): silu(-100) = -0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [32, 1536])
@pytest.mark.parametrize("tokens", [1, 7])
def test_silu_mul(tokens, inter, dtype):
    gen = _gen(tokens + inter)
    x = _strided(tokens, 2 * inter, dtype, gen).mul_(3)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp overflow, saturation, zero
    before = x._base.clone()
    out = tri.silu_mul(x)
    assert out.is_contiguous()
    _assert_close(out, ref.silu_mul(x))
    assert torch.equal(x._base, before)


def test_silu_mul_layouts():
    gen = _gen(62)
    x = torch.randn(64, 5, generator=gen).to(DEVICE).t()  # columns not contiguous: copied
    _assert_close(tri.silu_mul(x), ref.silu_mul(x))
    x = torch.randn(3, 2 * 1100, generator=gen).to(DEVICE)  # I = 1100: two masked chunks
    _assert_close(tri.silu_mul(x), ref.silu_mul(x))
    x = torch.randn(2, 3, 2 * 48 + PAD, generator=gen).to(DEVICE)[..., : 2 * 48]  # batch dims
    _assert_close(tri.silu_mul(x), ref.silu_mul(x))
    _assert_close(tri.silu_mul(x[0, 0]), ref.silu_mul(x[0, 0]))  # one row, [2I]


# ---------------------------------------------------------------- rotary_write_kv


def _rotary_case(tokens, num_heads, num_kv_heads, head_size, dtype, cos_dtype, seed,
                 block_size=16):  # fmt: skip
    """Random inputs: a strided qkv, angles of random positions, slots with -1 entries."""
    gen = _gen(seed)
    half = head_size // 2
    width = (num_heads + 2 * num_kv_heads) * head_size
    num_blocks = -(-tokens // block_size) + 2
    angles = torch.rand(tokens, 1, generator=gen) * 1000 * 10000 ** (-torch.arange(half) / half)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[1::3] = -1
    return {
        "qkv": _strided(tokens, width, dtype, gen),
        "cos": angles.cos().to(DEVICE, cos_dtype),
        "sin": angles.sin().to(DEVICE, cos_dtype),
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "k_cache": torch.randn(cache_shape, generator=gen).to(DEVICE, dtype),
        "v_cache": torch.randn(cache_shape, generator=gen).to(DEVICE, dtype),
        "slot_mapping": slots.to(DEVICE),
    }


def _check_rotary(args, rotate=tri.rotary_write_kv):
    """Run on args in place and the reference on clones; compare qkv (with its padding) and
    the caches; unwritten cache rows and V rows must be bitwise as the reference's."""
    qkv = args["qkv"]
    base = qkv._base if qkv._base is not None else qkv
    expected = dict(args)
    ref_base = base.clone()
    expected["qkv"] = ref_base.as_strided(qkv.shape, qkv.stride(), qkv.storage_offset())
    for name in ("k_cache", "v_cache"):
        expected[name] = args[name].clone()
    rotate(**args)
    ref.rotary_write_kv(**expected)
    _assert_close(base, ref_base)
    assert torch.equal(base[:, qkv.shape[1] :], ref_base[:, qkv.shape[1] :])  # the padding
    _assert_close(args["k_cache"], expected["k_cache"])
    assert torch.equal(args["v_cache"], expected["v_cache"])
    written = torch.zeros(args["k_cache"].shape[:2], dtype=torch.bool, device=qkv.device)
    slots = args["slot_mapping"].long()
    written.view(-1)[slots[slots >= 0]] = True
    assert torch.equal(args["k_cache"][~written], expected["k_cache"][~written])


def _rotary_dtypes():
    """(model dtype, cos/sin dtype): float32 angles always, the model dtype's too on CUDA."""
    return [(d, torch.float32) for d in DTYPES] + [(d, d) for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype,cos_dtype", _rotary_dtypes(), ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (14, 2)])
def test_rotary_write_kv(num_heads, num_kv_heads, head_size, tokens, dtype, cos_dtype):
    seed = num_heads + head_size + tokens
    args = _rotary_case(tokens, num_heads, num_kv_heads, head_size, dtype, cos_dtype, seed)
    _check_rotary(args)


def test_rotary_write_kv_layouts():
    # Caches whose block strides are not the dense ones, cos and sin as views of one
    # [T, D] table, int32 slots, D = 80 (halves of 40 are no power of two), block size 8.
    gen = _gen(63)
    args = _rotary_case(10, 4, 2, 80, torch.float32, torch.float32, seed=64, block_size=8)
    table = torch.randn(10, 80, generator=gen).to(DEVICE)
    args["cos"], args["sin"] = table[:, :40], table[:, 40:]
    args["k_cache"] = torch.randn(8, 8, 2, 80, generator=gen).to(DEVICE)[::2]
    args["v_cache"] = torch.randn(6, 8, 2, 80, generator=gen).to(DEVICE)[2:]
    slots = args["slot_mapping"].int()
    slots[slots == 4 * 8 - 1] = -1
    slots[-1] = 4 * 8 - 1  # the very last slot
    args["slot_mapping"] = slots
    assert not args["k_cache"].is_contiguous()
    _check_rotary(args)


def test_rotary_write_kv_all_skipped():
    # No slot: q and k still rotate in qkv, the caches stay as they were.
    args = _rotary_case(3, 4, 1, 64, torch.float32, torch.float32, seed=65)
    args["slot_mapping"] = torch.full((3,), -1, device=DEVICE)
    before = args["qkv"].clone(), args["k_cache"].clone(), args["v_cache"].clone()
    _check_rotary(args)
    assert not torch.equal(args["qkv"], before[0])
    assert torch.equal(args["qkv"][:, 5 * 64 :], before[0][:, 5 * 64 :])  # v untouched
    assert torch.equal(args["k_cache"], before[1]) and torch.equal(args["v_cache"], before[2])


# ---------------------------------------------------------------- dispatch, empty, bad input


def test_dispatch_reaches_triton():
    gen = _gen(66)
    x = _strided(3, 64, torch.float32, gen)
    weight = torch.randn(64, generator=gen).to(DEVICE)
    residual = _strided(3, 64, torch.float32, gen)
    ref_res = residual.clone()
    expected, _ = ref.rms_norm(x, weight, 1e-6, ref_res)
    with ops.use_backend("triton"):
        normed = ops.rms_norm(x, weight, 1e-6)
        out, returned = ops.rms_norm(x, weight, 1e-6, residual)
        act = ops.silu_mul(x)
    _assert_close(normed, ref.rms_norm(x, weight, 1e-6))
    assert returned is residual and torch.equal(residual, ref_res)
    _assert_close(out, expected)
    _assert_close(act, ref.silu_mul(x))
    args = _rotary_case(5, 2, 1, 64, torch.float32, torch.float32, seed=67)
    with ops.use_backend("triton"):
        _check_rotary(args, ops.rotary_write_kv)


def test_empty():
    weight = torch.ones(64, device=DEVICE)
    x = torch.empty(0, 64, device=DEVICE)
    assert tri.rms_norm(x, weight, 1e-6).shape == (0, 64)
    residual = torch.empty(0, 64, device=DEVICE)
    out, returned = tri.rms_norm(x, weight, 1e-6, residual)
    assert out.shape == (0, 64) and returned is residual
    assert tri.silu_mul(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)
    assert tri.silu_mul(torch.empty(3, 0, device=DEVICE)).shape == (3, 0)
    args = _rotary_case(0, 2, 1, 64, torch.float32, torch.float32, seed=68)
    before = args["k_cache"].clone()
    tri.rotary_write_kv(**args)
    assert torch.equal(args["k_cache"], before)


def test_bad_input():
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tri.rms_norm(x.long(), weight, 1e-6)
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        tri.rms_norm(x[None], weight, 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        tri.rms_norm(x, weight[:32], 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        tri.rms_norm(x, weight, 1e-6, x[:2].clone())
    with pytest.raises(ValueError, match="contiguous"):
        tri.rms_norm(x, weight, 1e-6, torch.randn(64, 3, device=DEVICE).t())
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        tri.silu_mul(x[:, :63])
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        tri.silu_mul(x[0, 0])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tri.silu_mul(x.double())

    def rotary(**changes):
        args = _rotary_case(3, 2, 1, 64, torch.float32, torch.float32, seed=69)
        args.update(changes)
        tri.rotary_write_kv(**args)

    with pytest.raises(ValueError, match=r"qkv must be \[T, \(H \+ 2 H_kv\) D\]"):
        rotary(num_heads=3)
    with pytest.raises(ValueError, match="H_kv"):
        rotary(num_kv_heads=2)
    with pytest.raises(ValueError, match=r"cos must be \[3, 32\]"):
        rotary(cos=torch.ones(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary(slot_mapping=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="slot_mapping must be int32 or int64"):
        rotary(slot_mapping=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        rotary(v_cache=torch.zeros(2, 16, 1, 64, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        cache = torch.zeros(2, 16, 1, 63, device=DEVICE)
        rotary(qkv=torch.zeros(3, 4 * 63, device=DEVICE), k_cache=cache, v_cache=cache)
    with pytest.raises(ValueError, match="rotated in place"):
        rotary(qkv=torch.zeros(256, 3, device=DEVICE).t())
    with pytest.raises(TypeError, match="k_cache"):
        rotary(k_cache=torch.zeros(4, 16, 1, 64, dtype=torch.int8, device=DEVICE))


# ---------------------------------------------------------------- compiled for sm_90, without a GPU

AOT_SCRIPT = r"""
import sys
import torch
import xllm.ops.cuda as tri
import triton_aot as aot

assert not tri.INTERPRETED
names = ("rms_norm_kernel", "silu_mul_kernel", "rotary_write_kv_kernel")
recorders = aot.record(tri, names)
bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32

def rotary(dtype, cos_dtype, slot_dtype, tokens, heads, kv_heads, head_size):
    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_size + 8, dtype=dtype)
    cos = torch.zeros(tokens, head_size // 2, dtype=cos_dtype)
    cache = torch.zeros(64, 16, kv_heads, head_size, dtype=dtype)
    slots = torch.zeros(tokens, dtype=slot_dtype)
    tri.rotary_write_kv(qkv[:, :-8], cos, cos, heads, kv_heads, cache, cache, slots)

# Qwen2-7B (3584), SmolLM2 (576), a float32 residual stream, rows of two chunks (16384).
tri.rms_norm(torch.zeros(256, 3584, dtype=bf16), torch.ones(3584, dtype=bf16), 1e-6,
             torch.zeros(256, 3584, dtype=bf16))
tri.rms_norm(torch.zeros(4, 576, dtype=f16), torch.ones(576, dtype=f16), 1e-5)
tri.rms_norm(torch.zeros(8, 896, dtype=bf16), torch.ones(896), 1e-6, torch.zeros(8, 896))
tri.rms_norm(torch.zeros(2, 16384, dtype=f16), torch.ones(16384, dtype=f16), 1e-6,
             torch.zeros(2, 16384, dtype=f16))
tri.rms_norm(torch.zeros(2, 16384), torch.ones(16384), 1e-6)
tri.silu_mul(torch.zeros(16, 2 * 18944, dtype=bf16))
tri.silu_mul(torch.zeros(4, 2 * 1536))
rotary(bf16, f32, torch.int64, 64, 28, 4, 128)  # Qwen2-7B
rotary(f16, f16, torch.int32, 7, 9, 3, 64)  # SmolLM2
rotary(f32, f32, torch.int64, 3, 14, 2, 64)

sys.exit(1 if aot.compile_recorded(recorders, spills_fail=True) else 0)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the tests above compile the kernels for real")
def test_fused_kernels_compile_for_hopper():
    # The interpreter checks neither types nor shape limits of compiled Triton: compile each
    # kernel, as the wrappers launch it, for sm_90.
    pytest.importorskip("triton.backends.nvidia")
    import triton_aot

    run = triton_aot.run_script(AOT_SCRIPT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok ") == 10
