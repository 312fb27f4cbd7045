"""Triton kernels of quantized weights (`xllm.ops.quant`): y = x @ W^T and row dequantization.

The weights stay packed in memory: a program loads the bytes of its rows 32 weights (one
block, or one sub-block of a q4_k / q6_k super-block) at a time, unpacks them in registers
with `_unpack_32` and multiplies them with x. QTYPE (a format name, a constexpr) picks the
unpacking at compile time, so each format compiles to its own kernel.

f16 and f32 scale fields are assembled from their little-endian bytes and bitcast, which
needs no alignment of the rows. The float operations follow `reference._dequantize_blocks`
in order ((d * scale) * q - dmin * min etc.), so dequantized weights match it bit for bit
(up to FMA contraction on the GPU).
"""

import triton
import triton.language as tl

SUB = tl.constexpr(32)  # weights unpacked per step: a block, or a sub-block of 256


@triton.jit
def _load_f16(ptr, mask):
    """float32 of the little-endian float16 at byte pointers ptr."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_f32(ptr, mask):
    """The little-endian float32 at byte pointers ptr."""
    bits = tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    bits |= tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32) << 8
    bits |= tl.load(ptr + 2, mask=mask, other=0).to(tl.uint32) << 16
    bits |= tl.load(ptr + 3, mask=mask, other=0).to(tl.uint32) << 24
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_bytes(ptr, mask):
    """Unsigned bytes at ptr as int32 (masked ones 0)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _load_int8(ptr, mask):
    """Signed bytes at ptr as float32 (masked ones 0)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _unpack_32(row, kb, cols, mask, QTYPE: tl.constexpr):
    """float32 weights [R, 32]: columns 32 kb + cols of the rows whose bytes start at `row`.

    row: byte pointers [R, 1] to the rows' starts; cols: tl.arange(0, 32)[None, :];
    mask [R, 1]: rows to read (the others give weights 0).
    """
    if QTYPE == "q8_0":
        base = row + kb * 34
        d = _load_f16(base, mask)
        w = d * _load_int8(base + 2 + cols, mask)
    elif QTYPE == "q4_0":
        base = row + kb * 18
        d = _load_f16(base, mask)
        qs = _load_bytes(base + 2 + cols % 16, mask)  # weight j, j + 16: low, high nibble
        q = tl.where(cols < 16, qs & 0xF, qs >> 4).to(tl.float32)
        w = d * (q - 8.0)
    elif QTYPE == "q4_1":
        base = row + kb * 20
        d = _load_f16(base, mask)
        m = _load_f16(base + 2, mask)
        qs = _load_bytes(base + 4 + cols % 16, mask)
        q = tl.where(cols < 16, qs & 0xF, qs >> 4).to(tl.float32)
        w = d * q + m
    elif QTYPE == "q4_k":
        base = row + (kb // 8) * 144
        j = kb % 8  # the sub-block
        d = _load_f16(base, mask)
        dmin = _load_f16(base + 2, mask)
        # 6-bit scale and min of sub-block j from scale bytes s[0:12] (ggml's
        # get_scale_min_k4): j < 4: s[j] & 63, s[j + 4] & 63; else the low 4 bits from
        # s[j + 4] and the high 2 from the top bits of s[j - 4], s[j].
        s_a = _load_bytes(base + 4 + j % 4, mask)
        s_b = _load_bytes(base + 8 + j % 4, mask)
        s_c = _load_bytes(base + 12 + j % 4, mask)
        scale = tl.where(j < 4, s_a & 63, (s_c & 0xF) | ((s_a >> 6) << 4)).to(tl.float32)
        mn = tl.where(j < 4, s_b & 63, (s_c >> 4) | ((s_b >> 6) << 4)).to(tl.float32)
        qs = _load_bytes(base + 16 + (j // 2) * 32 + cols, mask)  # 2c, 2c + 1 share chunk c
        q = ((qs >> ((j % 2) * 4)) & 0xF).to(tl.float32)
        w = (d * scale) * q - dmin * mn
    elif QTYPE == "q6_k":
        base = row + (kb // 8) * 210
        g = kb % 8  # 32-weight group: half g // 4, r = g % 4 within the half
        h = g // 4
        r = g % 4
        # Element 32 r + l of a half: nibble r // 2 of ql[l + 32 (r % 2)], bits 2r, 2r + 1
        # of qh[l]; scale scales[(128 h + 32 r + l) // 16].
        ql = _load_bytes(base + 64 * h + 32 * (r % 2) + cols, mask)
        qh = _load_bytes(base + 128 + 32 * h + cols, mask)
        q = (((ql >> ((r // 2) * 4)) & 0xF) | (((qh >> (2 * r)) & 3) << 4)) - 32
        scale = _load_int8(base + 192 + 2 * g + cols // 16, mask)
        d = _load_f16(base + 208, mask)
        w = (d * scale) * q.to(tl.float32)
    else:
        tl.static_assert(QTYPE == "int8", "unknown quantized format")
        scale = _load_f32(row, mask)  # the row header
        w = _load_int8(row + 4 + kb * 32 + cols, mask) * scale
    return w


@triton.jit
def quant_linear_kernel(
    x_ptr,
    data_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    num_subs,
    stride_xm,
    stride_data,
    stride_om,
    QTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[BLOCK_M, BLOCK_N] tile = x @ W^T (+ bias), W's rows unpacked 32 weights a step.

    tl.dot needs BLOCK_M >= 16; smaller tiles (decode) multiply, broadcast and sum.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    cols = tl.arange(0, SUB)[None, :]
    rows = data_ptr + offs_n.to(tl.int64)[:, None] * stride_data
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(num_subs):
        w = _unpack_32(rows, kb, cols, n_ok[:, None], QTYPE)  # [BLOCK_N, 32]
        x = tl.load(x_rows + kb * SUB + cols, mask=m_ok[:, None], other=0.0).to(tl.float32)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dequantize_kernel(
    data_ptr,
    rows_ptr,
    out_ptr,
    R,
    stride_data,
    stride_out,
    QTYPE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """float32 out[BLOCK_R rows, 32 columns] of the rows (rows_ptr's indices, or 0..R-1)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1)
    r_ok = offs_r < R
    if HAS_ROWS:
        src = tl.load(rows_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)
    else:
        src = offs_r.to(tl.int64)
    cols = tl.arange(0, SUB)[None, :]
    w = _unpack_32(data_ptr + src[:, None] * stride_data, kb, cols, r_ok[:, None], QTYPE)
    out = out_ptr + offs_r.to(tl.int64)[:, None] * stride_out + kb * SUB + cols
    tl.store(out, w, mask=r_ok[:, None])
