"""Triton KV cache kernels: scatter new key/value rows by slot; copy whole blocks (beam forks)."""

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per token: copy its [NUM_KV_HEADS, HEAD_SIZE] key and value rows."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_SIZE)
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(
        k_cache_ptr + block * stride_kcb + in_block * stride_kcs + heads * stride_kch + dims,
        key.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr + block * stride_vcb + in_block * stride_vcs + heads * stride_vch + dims,
        value.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def copy_blocks_kernel(
    k_cache_ptr,
    v_cache_ptr,
    block_mapping_ptr,
    stride_kl,
    stride_kb,
    stride_vl,
    stride_vb,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per (pair, layer): copy block src to block dst in K and V, CHUNK at a time.

    Each block's BLOCK_NUMEL elements (block_size * H_kv * D) are contiguous; the copy is
    bitwise in the caches' own dtype.
    """
    pair = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    src = tl.load(block_mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(block_mapping_ptr + 2 * pair + 1).to(tl.int64)
    k_src = k_cache_ptr + layer * stride_kl + src * stride_kb
    k_dst = k_cache_ptr + layer * stride_kl + dst * stride_kb
    v_src = v_cache_ptr + layer * stride_vl + src * stride_vb
    v_dst = v_cache_ptr + layer * stride_vl + dst * stride_vb
    for start in range(0, BLOCK_NUMEL, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < BLOCK_NUMEL
        tl.store(k_dst + offsets, tl.load(k_src + offsets, mask=mask), mask=mask)
        tl.store(v_dst + offsets, tl.load(v_src + offsets, mask=mask), mask=mask)
