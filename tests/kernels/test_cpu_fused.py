"""The C++ fused layer steps (`xllm.ops.cpu.rms_norm`, `silu_mul`, `rotary_write_kv`) against
the torch reference, once per instruction-set variant this CPU runs (`cpu_isa`)."""

import pytest
import torch

from xllm import ops
from xllm.ops import reference

try:
    from xllm.ops import cpu
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

TOL = {"rtol": 1e-5, "atol": 1e-5}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("hidden", [7, 64, 576, 900])
def test_rms_norm(tokens, hidden):
    wide = randn(tokens, hidden + 5)
    x = wide[:, 2 : 2 + hidden]  # a strided view
    weight = randn(hidden, seed=1)
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                               **TOL)
    residual, want_residual = randn(tokens, hidden, seed=2), randn(tokens, hidden, seed=2)
    out, res = cpu.rms_norm(x, weight, 1e-6, residual)
    want, want_res = reference.rms_norm(x, weight, 1e-6, want_residual)
    assert res is residual
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("tokens", [1, 4, 200])
@pytest.mark.parametrize("inter", [5, 32, 1536])
def test_silu_mul(tokens, inter):
    x = randn(tokens, 2 * inter + 3)[:, : 2 * inter] * 6  # strided; saturates both ends
    torch.testing.assert_close(cpu.silu_mul(x), reference.silu_mul(x), **TOL)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (14, 2, 128), (4, 4, 6)])
@pytest.mark.parametrize("tokens", [1, 7, 70])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_rotary_write_kv(heads, kv_heads, dim, tokens, slot_dtype, kv_dtype):
    width = (heads + 2 * kv_heads) * dim
    qkv = randn(tokens, width + 4)[:, :width]
    angles = randn(tokens, dim // 2, seed=1) * 3
    cos, sin = angles.cos(), angles.sin()
    caches = [torch.zeros(12, 8, kv_heads, dim, dtype=kv_dtype) for _ in range(4)]
    slots = torch.randperm(96, generator=torch.Generator().manual_seed(3))[:tokens]
    slots[::3] = -1
    slots = slots.to(slot_dtype)
    got, want = qkv.clone(), qkv.clone()
    cpu.rotary_write_kv(got, cos, sin, heads, kv_heads, caches[0], caches[1], slots)
    reference.rotary_write_kv(want, cos, sin, heads, kv_heads, caches[2], caches[3], slots)
    torch.testing.assert_close(got, want, **TOL)
    # A rotated key one float32 rounding away from the reference's may round to the other
    # neighbouring bfloat16: one bfloat16 step (2^-8 relative) for those.
    key_tol = TOL if kv_dtype == torch.float32 else {"atol": 1e-5, "rtol": 2**-8}
    torch.testing.assert_close(caches[0], caches[2], **key_tol)
    assert torch.equal(caches[1], caches[3])
    if kv_dtype == torch.bfloat16:  # the values, as torch rounds them
        assert torch.equal(caches[1].view(-1, kv_heads, dim)[slots[slots >= 0].long()],
                           qkv[slots >= 0, (heads + kv_heads) * dim:].reshape(-1, kv_heads, dim)
                           .to(torch.bfloat16))


def test_rotary_write_kv_refuses_a_slot_past_the_cache():
    qkv = randn(1, 3 * 8)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="slot"):
        cpu.rotary_write_kv(qkv, torch.ones(1, 4), torch.zeros(1, 4), 1, 1, cache, cache.clone(),
                            torch.tensor([8]))


def test_the_model_ops_dispatch_here():
    x = randn(2, 16)
    with ops.use_backend(None):
        assert torch.equal(ops.silu_mul(x), cpu.silu_mul(x))
