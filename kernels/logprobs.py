"""Triton top-k logprobs: tiled log-softmax statistics, per-tile top-k, then a merge.

Three launches, none of which writes the full log-softmax:
1. `chunk_stats_kernel`: per (row, vocab chunk) the max and the sum of exp(x - max).
2. `chunk_topk_kernel`: per (row, chunk) the row's log-sum-exp from (1), then the
   chunk's top K_PAD logprobs as packed int64 keys.
3. `merge_topk_kernel`: per row the top k of all chunks' keys, and the chosen token.

A key packs a logprob and its token id so that one integer order is the wanted
order: the high 32 bits are the float's bits made sign-ordered, the low 32 bits
are 2**31 - 1 - id, so equal logprobs put the lower id first.
"""

import triton
import triton.language as tl

MIN_KEY = tl.constexpr(-(2**63))


@triton.jit
def _row_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS_PAD: tl.constexpr):
    """Log-sum-exp of a row from its chunks' (max, sum of exp) pairs."""
    chunks = tl.arange(0, CHUNKS_PAD)
    ok = chunks < num_chunks
    m = tl.load(part_max_ptr + row * num_chunks + chunks, mask=ok, other=float("-inf"))
    s = tl.load(part_sum_ptr + row * num_chunks + chunks, mask=ok, other=0.0)
    m_all = tl.max(m, 0)
    m_base = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_base + tl.log(tl.sum(s * tl.exp(m - m_base), 0))


@triton.jit
def _pack_keys(logprob, ids):
    """Sign-ordered float bits in the high half, 2**31 - 1 - id in the low half."""
    bits = logprob.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    """(logprob float32, id int64) from keys made by `_pack_keys`."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    ids = 0x7FFFFFFF - keys.to(tl.int32)  # the low half, 2**31 - 1 - id, is non-negative
    return bits.to(tl.float32, bitcast=True), ids.to(tl.int64)


@triton.jit
def _top_keys(keys, k, K_PAD: tl.constexpr):
    """The K_PAD largest keys, largest first (only the first k are needed).

    k rounds of "take the max, then knock it out" (keys are distinct).
    """
    slots = tl.arange(0, K_PAD)
    top = tl.full([K_PAD], MIN_KEY, tl.int64)
    for slot in range(k):
        best = tl.max(keys, 0)
        top = tl.where(slots == slot, best, top)
        keys = tl.where(keys == best, MIN_KEY, keys)
    return top


@triton.jit
def chunk_stats_kernel(
    logits_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_row,
    vocab,
    BLOCK_V: tl.constexpr,
):
    """Max and sum of exp(x - max) of one vocab chunk of one row."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    ids = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(logits_ptr + row * stride_row + ids, mask=ids < vocab, other=float("-inf"))
    x = x.to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)), 0)
    tl.store(part_max_ptr + row * num_chunks + chunk, m)
    tl.store(part_sum_ptr + row * num_chunks + chunk, s)


@triton.jit
def chunk_topk_kernel(
    logits_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_keys_ptr,
    stride_row,
    vocab,
    k,
    BLOCK_V: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """The best K_PAD (logprob, id) keys of one vocab chunk of one row."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    lse = _row_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS_PAD)
    ids = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = ids < vocab
    x = tl.load(logits_ptr + row * stride_row + ids, mask=ok, other=0.0).to(tl.float32)
    keys = tl.where(ok, _pack_keys(x - lse, ids), MIN_KEY)
    top = _top_keys(keys, k, K_PAD)
    out = (row * num_chunks + chunk) * K_PAD + tl.arange(0, K_PAD)
    tl.store(part_keys_ptr + out, top)


@triton.jit
def merge_topk_kernel(
    logits_ptr,
    token_ids_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_keys_ptr,
    values_ptr,
    indices_ptr,
    chosen_ptr,
    stride_row,
    num_chunks,
    k,
    CHUNKS_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    MERGE_PAD: tl.constexpr,
):
    """Top k of one row from its chunks' keys, plus the chosen token's logprob."""
    row = tl.program_id(0).to(tl.int64)
    lse = _row_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS_PAD)
    offs = tl.arange(0, MERGE_PAD)
    keys = tl.load(
        part_keys_ptr + row * num_chunks * K_PAD + offs,
        mask=offs < num_chunks * K_PAD,
        other=MIN_KEY,
    )
    top = _top_keys(keys, k, K_PAD)
    values, ids = _unpack_keys(top)
    slots = tl.arange(0, K_PAD)
    tl.store(values_ptr + row * k + slots, values, mask=slots < k)
    tl.store(indices_ptr + row * k + slots, ids, mask=slots < k)
    token = tl.load(token_ids_ptr + row)
    chosen = tl.load(logits_ptr + row * stride_row + token).to(tl.float32) - lse
    tl.store(chosen_ptr + row, chosen)
