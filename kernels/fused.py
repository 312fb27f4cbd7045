"""Triton fused elementwise kernels of a decoder layer: RMSNorm (with the residual add),
silu(gate) * up, and rotary embedding of q and k with the KV cache write.

All math is float32; results are rounded to the output's dtype once, where the reference
(`xllm.ops.reference`) rounds: the new residual before it is normed, the rotated keys before
they go to the cache.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr,
    weight_ptr,
    residual_ptr,
    out_ptr,
    width,
    eps,
    stride_x,
    stride_r,
    stride_o,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    """One program per row: out = x * rsqrt(mean(x^2) + eps) * weight.

    With a residual, first residual += x (stored in the residual's dtype) and the norm of the
    stored sum. ONE_PASS (BLOCK_H >= width) keeps the row in registers; otherwise a first pass
    over BLOCK_H chunks adds the residual and sums the squares, and a second one reads the row
    (the updated residual) back and writes the output.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    x_row = x_ptr + row * stride_x
    r_row = residual_ptr + row * stride_r
    o_row = out_ptr + row * stride_o
    if ONE_PASS:
        mask = cols < width
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(residual_ptr.dtype.element_ty)
            tl.store(r_row + cols, s, mask=mask)
            x = s.to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, width, BLOCK_H):
            offs = start + cols
            mask = offs < width
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(residual_ptr.dtype.element_ty)
                tl.store(r_row + offs, s, mask=mask)
                x = s.to(tl.float32)
            acc += x * x
        inv = tl.math.rsqrt(tl.sum(acc, axis=0) / width + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the program's residual stores are visible to all its threads
            src = r_row
        else:
            src = x_row
        for start in range(0, width, BLOCK_H):
            offs = start + cols
            mask = offs < width
            x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_kernel(
    x_ptr,
    out_ptr,
    inter,
    stride_x,
    stride_o,
    BLOCK_I: tl.constexpr,
):
    """Program (row, chunk): out[row, cols] = silu(x[row, cols]) * x[row, inter + cols]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < inter
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_write_kv_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program (token, head group): BLOCK_HEADS of the token's H + 2 H_kv heads q | k | v.

    q and k heads are rotated in place (rotate-half: element i pairs with i + D / 2); k and v
    heads go to the caches at the token's slot unless it is -1. Each head is loaded as its
    two halves [BLOCK_HEADS, HALF_PAD]; v heads pass through unrotated.
    """
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)[:, None]
    HALF: tl.constexpr = HEAD_SIZE // 2
    dims = tl.arange(0, HALF_PAD)[None, :]
    dim_ok = dims < HALF
    rotated = heads < NUM_HEADS + NUM_KV_HEADS  # q and k heads
    in_row = heads < NUM_HEADS + 2 * NUM_KV_HEADS

    row = qkv_ptr + token * stride_qkv + heads * HEAD_SIZE + dims
    mask = in_row & dim_ok
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + token * stride_cos + dims, mask=dim_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_sin + dims, mask=dim_ok, other=0.0).to(tl.float32)
    y1 = tl.where(rotated, x1 * c - x2 * s, x1).to(qkv_ptr.dtype.element_ty)
    y2 = tl.where(rotated, x2 * c + x1 * s, x2).to(qkv_ptr.dtype.element_ty)
    rot_mask = rotated & dim_ok
    tl.store(row, y1, mask=rot_mask)
    tl.store(row + HALF, y2, mask=rot_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    # A [BLOCK_HEADS, 1] condition: the interpreter gives `tensor & scalar` an integer dtype,
    # which it then refuses as a mask.
    written = (heads * 0 + slot) >= 0
    k_mask = (heads >= NUM_HEADS) & rotated & dim_ok & written
    k_dst = (
        k_cache_ptr
        + block * stride_kcb
        + in_block * stride_kcs
        + (heads - NUM_HEADS) * stride_kch
        + dims
    )
    tl.store(k_dst, y1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    v_mask = (heads >= NUM_HEADS + NUM_KV_HEADS) & in_row & dim_ok & written
    v_dst = (
        v_cache_ptr
        + block * stride_vcb
        + in_block * stride_vcs
        + (heads - NUM_HEADS - NUM_KV_HEADS) * stride_vch
        + dims
    )
    tl.store(v_dst, y1.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
    tl.store(v_dst + HALF, y2.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
