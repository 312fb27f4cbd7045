"""Plain torch versions of every kernel: the oracle of the kernel tests.

Readable first, fast never. Each function has the same signature as its C++
(`csrc/`) and Triton (`kernels/`) twins; `xllm.ops` picks one of the three.
"""

import torch


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a flat batch of queries over a paged KV cache.

    q: [T, H, D], the queries of B sequences laid end to end; sequence b owns
       rows query_start_loc[b]:query_start_loc[b+1] (a prefill chunk or one
       decode token), which are the last rows of its seq_lens[b] tokens.
    k_cache, v_cache: [num_blocks, block_size, H_kv, D]; H is a multiple of H_kv.
    query_start_loc: [B + 1] int32; seq_lens: [B] int32, tokens in the cache
       including this step's; block_tables: [B, max_blocks] int32.
    Returns [T, H, D] in q's dtype; the query at position p sees keys 0..p.
    """
    num_heads, head_size = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        q_len, seq_len = end - start, int(seq_lens[b])
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[b, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        future = torch.arange(seq_len, device=q.device)[None, :] > query_pos[:, None]
        scores.masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter key/value rows [T, H_kv, D] into the caches at slot_mapping [T].

    Slot s is row s % block_size of block s // block_size; a slot of -1 is skipped.
    """
    num_kv_heads, head_size = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, num_kv_heads, head_size)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_size)[slots] = value[keep].to(v_cache.dtype)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy whole KV cache blocks in every layer, in place (copy-on-write of beam forks).

    k_cache, v_cache: the stacked caches [num_layers, num_blocks, block_size, H_kv, D].
    block_mapping: [P, 2] int64 (or int32) pairs (src, dst): in every layer, block dst of
       both caches becomes a copy of block src. A source may appear in several pairs;
       destinations are distinct and never a source in the same call (not checked here).
       P may be 0. Ids must lie in 0..num_blocks-1 (here torch's indexing raises past the end).
    """
    src, dst = block_mapping.long().unbind(1)
    k_cache[:, dst] = k_cache[:, src]
    v_cache[:, dst] = v_cache[:, src]


def topk_logprobs(
    logits: torch.Tensor, k: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of each row's log-softmax, plus the logprob of a chosen token.

    logits: [N, V]; k: 1..20 (at most V); token_ids: [N] int64.
    Returns (values [N, k] float32, indices [N, k] int64, chosen [N] float32),
    best first; equal logprobs are ordered by lower token id first.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    chosen = logprobs.gather(1, token_ids.long()[:, None])[:, 0]
    return values[:, :k].contiguous(), indices[:, :k].contiguous(), chosen


def beam_prune(
    beam_scores: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    num_keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best continuations of each beam group by summed score.

    beam_scores: [G, W] float32 cumulative scores of the live beams (-inf for a
       padded, dead beam); cand_tokens: [G, W, C] int64 and cand_logprobs:
       [G, W, C] float32, each beam's candidate next tokens; num_keep <= W * C
       (beam search keeps 2 * W).
    Returns (parent beam [G, K] int64, token [G, K] int64, score [G, K] float32)
    with K = num_keep, best first; ties go to the lower beam, then the lower
    token id.
    """
    groups, width, cands = cand_tokens.shape
    scores = (beam_scores.float()[:, :, None] + cand_logprobs.float()).reshape(groups, -1)
    tokens = cand_tokens.reshape(groups, -1)
    parents = torch.arange(width, device=cand_tokens.device).repeat_interleave(cands)
    parents = parents.expand(groups, -1)
    # Stable sorts from the least to the most significant key.
    order = torch.sort(tokens, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(parents.gather(1, order), dim=1, stable=True).indices)
    by_score = torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True).indices
    order = order.gather(1, by_score)[:, :num_keep]
    return parents.gather(1, order), tokens.gather(1, order), scores.gather(1, order)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias): x [..., K], weight [N, K], bias [N]; returns [..., N]."""
    return torch.nn.functional.linear(x, weight, bias)
