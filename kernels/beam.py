"""Triton beam pruning: per beam group, the best continuations by summed score."""

import triton
import triton.language as tl


@triton.jit
def beam_prune_kernel(
    beam_scores_ptr,
    cand_tokens_ptr,
    cand_logprobs_ptr,
    parents_ptr,
    tokens_ptr,
    scores_ptr,
    width,
    cands,
    num_keep,
    N_PAD: tl.constexpr,
    TILE_J: tl.constexpr,
):
    """One program per group: rank every candidate by counting those that beat it.

    Candidate j beats i if its score is higher, or equal with a lower beam, or
    equal beam with a lower token, or all equal and earlier in the input. The
    order is total, so ranks are distinct; ranks below num_keep are scattered
    to their output slots, which gives the best-first order.
    """
    group = tl.program_id(0).to(tl.int64)
    n = width * cands
    i = tl.arange(0, N_PAD)
    ok_i = i < n
    beam_i = i // cands
    score_i = tl.load(beam_scores_ptr + group * width + beam_i, mask=ok_i, other=0.0).to(
        tl.float32
    ) + tl.load(cand_logprobs_ptr + group * n + i, mask=ok_i, other=0.0).to(tl.float32)
    token_i = tl.load(cand_tokens_ptr + group * n + i, mask=ok_i, other=0)
    rank = tl.zeros([N_PAD], tl.int32)
    for start in range(0, n, TILE_J):
        j = start + tl.arange(0, TILE_J)
        ok_j = j < n
        beam_j = j // cands
        score_j = tl.load(beam_scores_ptr + group * width + beam_j, mask=ok_j, other=0.0).to(
            tl.float32
        ) + tl.load(cand_logprobs_ptr + group * n + j, mask=ok_j, other=0.0).to(tl.float32)
        token_j = tl.load(cand_tokens_ptr + group * n + j, mask=ok_j, other=0)
        same_beam_first = (token_j[None, :] < token_i[:, None]) | (
            (token_j[None, :] == token_i[:, None]) & (j[None, :] < i[:, None])
        )
        tie_first = (beam_j[None, :] < beam_i[:, None]) | (
            (beam_j[None, :] == beam_i[:, None]) & same_beam_first
        )
        beats = (score_j[None, :] > score_i[:, None]) | (
            (score_j[None, :] == score_i[:, None]) & tie_first
        )
        beats = beats & ok_j[None, :]
        rank += tl.sum(beats.to(tl.int32), 1)
    keep = ok_i & (rank < num_keep)
    out = group * num_keep + rank
    tl.store(parents_ptr + out, beam_i.to(tl.int64), mask=keep)
    tl.store(tokens_ptr + out, token_i.to(tl.int64), mask=keep)
    tl.store(scores_ptr + out, score_i, mask=keep)
