"""Plain torch versions of every kernel: the oracle of the kernel tests.

Readable first, fast never. Each function has the same signature as its C++
(`csrc/`) and Triton (`kernels/`) twins; `xllm.ops` picks one of the three.
"""

import torch

from xllm.ops.panels import F32Panels, unpack_panels
from xllm.ops.quant import INT8_PANEL, INT8_ZERO, Int8Packed, int8_weight_bytes, quant_format


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


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: [N] int64, the first index of each row's largest logit of [N, V]
    (V >= 1), or of its first NaN."""
    return logits.argmax(dim=-1)


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


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """y = x @ weight^T (+ bias): x [..., K], weight [N, K], bias [N]; returns [..., N].

    bf16_products: the kernels may multiply x and weight rounded to bfloat16 (summing in
    float32) where that is faster, as torch's "medium" float32 matmul precision allows; the
    reference gives that rounded product (`bf16_product`)."""
    if bf16_products:
        return bf16_product(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def panel_linear(
    x: torch.Tensor, panels: F32Panels, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W^T (+ bias) in float32 for W packed in panels (`xllm.ops.panels`)."""
    return linear(x, unpack_panels(panels), bias)


def bf16_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T (+ bias) of x and weight rounded to bfloat16, in float32."""
    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(torch.float32)

    return torch.nn.functional.linear(rounded(x), rounded(weight), bias).to(x.dtype)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """float32 of little-endian float16 bytes [..., 2]."""
    return raw.contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> [..., 2n]: the n low nibbles, then the n high ones."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1).float()


def _q4_k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins [..., 8] of q4_k's 12 scale bytes [..., 12]."""
    q = raw.long()
    low = q[..., :4] & 63, q[..., 4:8] & 63
    high_scale = (q[..., 8:] & 0xF) | ((q[..., :4] >> 6) << 4)
    high_min = (q[..., 8:] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return torch.cat((low[0], high_scale), -1).float(), torch.cat((low[1], high_min), -1).float()


def _dequantize_blocks(qtype: str, b: torch.Tensor) -> torch.Tensor:
    """Weights [R, blocks, block] of blocks [R, blocks, block_bytes] (uint8)."""
    if qtype == "q8_0":
        return _f16(b[..., 0:2])[..., None] * b[..., 2:].view(torch.int8).float()
    if qtype == "q4_0":
        return _f16(b[..., 0:2])[..., None] * (_nibbles(b[..., 2:]) - 8)
    if qtype == "q4_1":
        return _f16(b[..., 0:2])[..., None] * _nibbles(b[..., 4:]) + _f16(b[..., 2:4])[..., None]
    if qtype == "q4_k":
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        scales, mins = _q4_k_scales(b[..., 4:16])
        chunks = b[..., 16:].unflatten(-1, (4, 32))  # sub-blocks 2c, 2c + 1 share chunk c
        q = torch.stack((chunks & 0xF, chunks >> 4), dim=-2).flatten(-3, -2).float()  # [.., 8, 32]
        return (d * scales)[..., None] * q - (dmin * mins)[..., None]
    if qtype == "q6_k":
        ql = b[..., :128].unflatten(-1, (2, 2, 32))  # [half, ql[l] / ql[l + 32], l]
        qh = b[..., 128:192].unflatten(-1, (2, 32))  # [half, l]
        scales = b[..., 192:208].view(torch.int8).float()
        d = _f16(b[..., 208:210])[..., None]
        # Within a half, element 32r + l takes nibble r // 2 of ql[l + 32 (r % 2)] and bits
        # 2r, 2r + 1 of qh[l].
        low = torch.stack((ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF,
                           ql[..., 0, :] >> 4, ql[..., 1, :] >> 4), dim=-2)
        high = torch.stack([(qh >> (2 * r)) & 3 for r in range(4)], dim=-2)
        q = (low.long() | (high.long() << 4)).flatten(-3) - 32  # [..., 256]
        return d * scales.repeat_interleave(16, dim=-1) * q.float()
    if qtype == "int8":
        raise AssertionError("int8 rows carry a header; see dequantize")
    raise ValueError(f"unknown quantized format {qtype!r}")


def dequantize(data: torch.Tensor, qtype: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 weights [R, K] of quantized rows data [N, row_bytes] (uint8, `xllm.ops.quant`).

    rows: [R] int64 row indices (an embedding lookup), or None for all N rows.
    """
    fmt = quant_format(qtype)
    if rows is not None:
        data = data[rows.long()]
    k = fmt.columns(data.shape[1])
    if qtype == "int8":
        scale = data[:, :4].contiguous().view(torch.float32)
        return data[:, 4:].view(torch.int8).float() * scale
    blocks = data.view(data.shape[0], k // fmt.block, fmt.block_bytes)
    return _dequantize_blocks(qtype, blocks).reshape(data.shape[0], k)


def quant_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: str,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W the quantized rows data [N, row_bytes]: x [..., K] float32.
    bf16_products: as in `linear`."""
    return linear(x.float(), dequantize(data, qtype), bias, bf16_products)


def unpack_int8(packed: Int8Packed) -> torch.Tensor:
    """float32 weights [n, k] of rows packed by `xllm.ops.quant.pack_int8`."""
    qtype, data = packed.qtype, packed.data
    panels, blocks, _ = data.shape
    weights = int8_weight_bytes(qtype)
    raw = data[..., :weights].unflatten(-1, (-1, INT8_PANEL, 4))  # [P, B, g, j, t]
    if qtype != "q8_0":
        raw = torch.cat((raw & 0xF, raw >> 4), dim=2)  # groups of the high nibbles after
    q = raw.permute(0, 3, 1, 2, 4).reshape(panels, INT8_PANEL, blocks, 32).float()

    def scale(at: int) -> torch.Tensor:  # [P, 16, B, 1]
        f32 = data[..., at:at + 4 * INT8_PANEL].contiguous().view(torch.float32)
        return f32.permute(0, 2, 1)[..., None]

    w = scale(weights) * (q - INT8_ZERO[qtype])
    if qtype == "q4_1":
        w = w + scale(weights + 4 * INT8_PANEL)
    return w.reshape(panels * INT8_PANEL, blocks * 32)[: packed.n]


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] rounded to int8 per block of 32: q [M, K] (float, integer values) and the
    scales d [M, K / 32] = amax / 127, with q = round(x * (127 / amax)) (ties to even)."""
    blocks = x.float().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # 127 / amax as one float32 division (torch's `127.0 / t` multiplies by a reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return torch.round(blocks * inv).flatten(-2), (amax / 127.0).squeeze(-1)


def int8_linear(
    x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with int8 products (`--matmul-precision low`): x [..., K] rounded
    by `int8_rows`, times W (`unpack_int8`), summed in float64; returns float32 [..., n]."""
    rows = x.reshape(-1, packed.k)
    q, d = int8_rows(rows)
    xq = (q.double().unflatten(-1, (-1, 32)) * d.double()[..., None]).flatten(-2)
    y = xq @ unpack_int8(packed).double().T
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], packed.n)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] times weight [H]; with a residual [T, H], first residual += x (in
    place) and the norm of the sum, returning (normed, residual)."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (normed * weight.float()).to(x.dtype)
    return out if residual is None else (out, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [T, 2I] = [gate | up]; returns [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotary embedding of q and k, in place, then their keys and values into the cache.

    qkv: [T, (H + 2 H_kv) D], each row q | k | v of one token (row stride may exceed the
       width); cos, sin: [T, D / 2], the angles of each token's position (rotate-half:
       element i pairs with i + D / 2); k_cache, v_cache, slot_mapping: as `write_kv`.
    """
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[3]
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(tokens, -1, head_dim)
    x1, x2 = qk.float().chunk(2, dim=-1)
    c, s = cos.float()[:, None], sin.float()[:, None]
    qk.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    k = qk[:, num_heads:]
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(tokens, num_kv_heads, head_dim)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
