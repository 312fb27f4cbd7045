"""Triton paged attention: prefill chunks and decodes in one launch, split-KV for long contexts."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence that owns program `q_block`.

    Sequence b owns the programs from query_start_loc[b] // BLOCK_Q + b on; that
    numbering leaves room for every sequence's last, partial query block without
    reading the lengths on the host. In a decode batch (query_start_loc[b] = b) the
    owner follows from q_block alone; that guess is checked with two loads that do not
    wait on each other, and the binary search (a chain of dependent loads) runs only
    where it is wrong.
    """
    period, place = q_block // (BLOCK_Q + 1), q_block % (BLOCK_Q + 1)
    guess = tl.minimum(period * BLOCK_Q + tl.minimum(place, BLOCK_Q - 1), num_seqs - 1)
    first = tl.load(query_start_loc_ptr + guess) // BLOCK_Q + guess
    after = tl.load(query_start_loc_ptr + guess + 1) // BLOCK_Q + guess + 1
    owned = (first <= q_block) & ((guess == num_seqs - 1) | (q_block < after))
    lo = tl.where(owned, guess, 0)
    hi = tl.where(owned, guess, num_seqs - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit(do_not_specialize=["num_seqs", "num_heads", "num_splits"])
def paged_attention_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    num_seqs,
    num_heads,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    MIN_SPLIT_TILES: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: BLOCK_Q query tokens x all GROUP query heads of one KV head, one KV split.

    Rows of the program's tile are (token, head) pairs, token-major, so each K/V
    tile is loaded once for the whole head group. qk_scale is scale * log2(e);
    the softmax runs in base 2. Without SPLIT the program writes the normalized
    output. With SPLIT, the sequence's own visible keys (not its block table's
    width) are cut into num_splits runs of at least MIN_SPLIT_TILES tiles; the
    program writes its run's running max and sum, and its unnormalized
    accumulator unless the run is empty, for `reduce_splits_kernel`.
    """
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_off = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_off >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_off + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    q_pos = ctx_len + q_idx

    # Keys 0 .. kv_end - 1 are visible to some row of this program.
    kv_end = ctx_len + tl.minimum(q_off + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if SPLIT:
        per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), MIN_SPLIT_TILES)
        tile_lo = split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    cols = tl.arange(0, TILE_N)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in tl.range(tile_lo, tile_hi):
        kv_pos = tile * TILE_N + cols
        kv_ok = kv_pos < kv_end
        block = tl.load(block_row + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        in_block = kv_pos % BLOCK_SIZE
        k = tl.load(
            k_cache_ptr
            + block[:, None] * stride_kb
            + in_block[:, None] * stride_ks
            + kv_head * stride_kh
            + dims[None, :],
            mask=kv_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr
            + block[:, None] * stride_vb
            + in_block[:, None] * stride_vs
            + kv_head * stride_vh
            + dims[None, :],
            mask=kv_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        part = (token * num_heads + head) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        if tile_lo < tile_hi:
            tl.store(
                part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :],
                acc,
                mask=row_ok[:, None],
            )
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def reduce_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """One program per (token, head): merge the KV splits' partial softmax states.

    A split that saw no key has a max of -inf; its accumulator was never written
    and is not read.
    """
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    part = (token * num_heads + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l_sum = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    m_all = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    denom = tl.sum(weight * l_sum, 0)
    dims = tl.arange(0, HEAD_PAD)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :],
        mask=(split_ok & (m > float("-inf")))[:, None],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_SIZE,
    )
