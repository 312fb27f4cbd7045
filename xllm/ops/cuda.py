"""Triton backend of `xllm.ops`: launches the `xllm_triton` kernels with the reference signatures.

On CUDA tensors the kernels run compiled; on CPU tensors they run only under
TRITON_INTERPRET=1 (set before triton is first imported), which is how the
kernel tests run without a GPU.
"""

import contextlib
import functools
import math

import torch
import triton

from xllm.ops.panels import F32Panels, unpack_panels
from xllm.ops.quant import quant_format
from xllm_triton.attention import LOG2E, paged_attention_kernel, reduce_splits_kernel
from xllm_triton.beam import beam_prune_kernel
from xllm_triton.cache import copy_blocks_kernel, write_kv_kernel
from xllm_triton.fused import rms_norm_kernel, rotary_write_kv_kernel, silu_mul_kernel
from xllm_triton.logprobs import chunk_stats_kernel, chunk_topk_kernel, merge_topk_kernel
from xllm_triton.quant import SUB, dequantize_kernel, quant_linear_kernel


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """See `xllm.ops.reference.linear`. Linear layers on CUDA are cuBLAS's job (tuned GEMMs
    and tensor cores); a Triton GEMM here would only add compile time. bf16_products allows,
    it does not require: cuBLAS follows torch's own float32 matmul precision."""
    return torch.nn.functional.linear(x, weight, bias)


def panel_linear(
    x: torch.Tensor, panels: F32Panels, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """See `xllm.ops.reference.panel_linear`. Panels are the CPU's layout (the runner packs
    none on CUDA); a model packed on the CPU still runs here, on its rows unpacked."""
    return linear(x, unpack_panels(panels), bias)


INTERPRETED = not isinstance(write_kv_kernel, triton.runtime.JITFunction)
VOCAB_CHUNK = 4096
MIN_SPLIT_TOKENS = 128  # the fewest keys one KV split of a sequence takes
MAX_SPLITS = 128
PROGRAMS_PER_SM = 4  # decode attention splits KV until about this many programs run per SM
COPY_CHUNK = 2048  # elements a copy_blocks program moves per step (a power of two)
QUANT_SUB = SUB.value  # weights a quantized kernel unpacks per step


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_context(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The device context a launch on `tensor` needs; refuses CPU tensors unless interpreted."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    if not INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    return contextlib.nullcontext()


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_splits(device: torch.device, programs: int) -> int:
    """KV splits per program so that about PROGRAMS_PER_SM programs run per SM.

    Chosen from the launch's shape alone (sequences x KV heads), never from the block
    table's width: each sequence cuts its own context into at most this many runs
    of at least MIN_SPLIT_TOKENS keys, in the kernel.
    """
    target = PROGRAMS_PER_SM * _num_sms(device)
    if programs >= target:
        return 1
    return min(_next_pow2(triton.cdiv(target, programs)), MAX_SPLITS)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See `xllm.ops.reference.paged_attention`."""
    return paged_attention_with(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale)


def paged_attention_with(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    tile_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """`paged_attention` with the launch choices open (tests and the tuning sweep set them).

    Reads no tensor values on the host: the launch shape follows from shapes
    alone, so the call can be captured in a CUDA graph.
    """
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last dimension must be contiguous")
    q = _last_dim_contiguous(q)
    query_start_loc = query_start_loc.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    block_tables = _last_dim_contiguous(block_tables.to(torch.int32))

    decode_only = num_tokens <= num_seqs
    if block_m is None:
        block_m = 16 if decode_only else 64
    block_m = max(block_m, _next_pow2(group))
    block_q = block_m // group
    head_pad = max(16, _next_pow2(head_size))
    if tile_n is None:  # float32 tiles of 64 keys spill registers on sm_90
        tile_n = 32 if q.dtype == torch.float32 and q.is_cuda else 64
    q_blocks = num_tokens // block_q + num_seqs
    if num_splits is None:
        busy = num_seqs if decode_only else q_blocks
        num_splits = _choose_splits(q.device, busy * num_kv_heads)

    if num_splits > 1:
        part_acc = torch.empty(
            num_tokens, num_heads, num_splits, head_pad, dtype=torch.float32, device=q.device
        )
        part_max = torch.empty(
            num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device
        )
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch = {"num_warps": num_warps or 4}  # 4 warps: best on sm_90 for decode and prefill
    if num_stages is not None:
        launch["num_stages"] = num_stages
    with _launch_context(q):
        paged_attention_kernel[(q_blocks, num_kv_heads, num_splits)](
            out, part_acc, part_max, part_sum,
            q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
            scale * LOG2E, num_seqs, num_heads, num_splits,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0),
            GROUP=group, HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
            MIN_SPLIT_TILES=max(1, MIN_SPLIT_TOKENS // tile_n), SPLIT=num_splits > 1,
            PRECISION=precision, **launch,
        )  # fmt: skip
        if num_splits > 1:
            reduce_splits_kernel[(num_tokens, num_heads)](
                out, part_acc, part_max, part_sum, num_heads, num_splits,
                out.stride(0), out.stride(1),
                HEAD_SIZE=head_size, HEAD_PAD=head_pad, SPLITS_PAD=_next_pow2(num_splits),
            )  # fmt: skip
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """See `xllm.ops.reference.write_kv`."""
    num_tokens = key.shape[0]
    _, block_size, num_kv_heads, head_size = k_cache.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last dimension must be contiguous")
    key = _last_dim_contiguous(key)
    value = _last_dim_contiguous(value)
    slot_mapping = slot_mapping.contiguous()
    with _launch_context(key):
        write_kv_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size,
            HEADS_PAD=_next_pow2(num_kv_heads), HEAD_PAD=_next_pow2(head_size),
            BLOCK_SIZE=block_size,
        )  # fmt: skip


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """See `xllm.ops.reference.copy_blocks`."""
    if k_cache.dim() != 5 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            "k_cache and v_cache must both be [num_layers, num_blocks, block_size, H_kv, D]"
        )
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [P, 2], got {list(block_mapping.shape)}")
    if block_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_mapping must be int32 or int64, got {block_mapping.dtype}")
    num_pairs, num_layers = block_mapping.shape[0], k_cache.shape[0]
    block_numel = math.prod(k_cache.shape[2:])
    if num_pairs == 0 or num_layers == 0 or block_numel == 0:
        return
    if not (k_cache[0, 0].is_contiguous() and v_cache[0, 0].is_contiguous()):
        raise ValueError("each block of the KV caches must be contiguous")
    block_mapping = block_mapping.to(k_cache.device).contiguous()
    with _launch_context(k_cache):
        copy_blocks_kernel[(num_pairs, num_layers)](
            k_cache, v_cache, block_mapping,
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            BLOCK_NUMEL=block_numel, CHUNK=min(COPY_CHUNK, _next_pow2(block_numel)),
        )  # fmt: skip


def topk_logprobs(
    logits: torch.Tensor, k: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.topk_logprobs`."""
    return topk_logprobs_with(logits, k, token_ids)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """See `xllm.ops.reference.argmax` (torch's own CUDA reduction serves it)."""
    return logits.argmax(dim=-1)


def topk_logprobs_with(
    logits: torch.Tensor,
    k: int,
    token_ids: torch.Tensor,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_logprobs` with the chunk size open (for tests and benchmarks)."""
    rows, vocab = logits.shape
    device = logits.device
    values = torch.empty(rows, k, dtype=torch.float32, device=device)
    indices = torch.empty(rows, k, dtype=torch.int64, device=device)
    chosen = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:
        return values, indices, chosen
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    logits = _last_dim_contiguous(logits)
    token_ids = token_ids.to(torch.int64).contiguous()
    k_pad = _next_pow2(k)
    block_v = max(min(_next_pow2(vocab_chunk), _next_pow2(vocab)), k_pad)
    num_chunks = triton.cdiv(vocab, block_v)
    chunks_pad = _next_pow2(num_chunks)
    part_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_keys = torch.empty(rows, num_chunks, k_pad, dtype=torch.int64, device=device)
    with _launch_context(logits):
        chunk_stats_kernel[(rows, num_chunks)](
            logits, part_max, part_sum, logits.stride(0), vocab, BLOCK_V=block_v
        )
        chunk_topk_kernel[(rows, num_chunks)](
            logits, part_max, part_sum, part_keys, logits.stride(0), vocab, k,
            BLOCK_V=block_v, CHUNKS_PAD=chunks_pad, K_PAD=k_pad,
        )  # fmt: skip
        merge_topk_kernel[(rows,)](
            logits, token_ids, part_max, part_sum, part_keys, values, indices, chosen,
            logits.stride(0), num_chunks, k,
            CHUNKS_PAD=chunks_pad, K_PAD=k_pad, MERGE_PAD=_next_pow2(num_chunks * k_pad),
        )  # fmt: skip
    return values, indices, chosen


def beam_prune(
    beam_scores: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    num_keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.beam_prune`."""
    groups, width, cands = cand_tokens.shape
    device = beam_scores.device
    parents = torch.empty(groups, num_keep, dtype=torch.int64, device=device)
    tokens = torch.empty(groups, num_keep, dtype=torch.int64, device=device)
    scores = torch.empty(groups, num_keep, dtype=torch.float32, device=device)
    if groups == 0 or num_keep == 0:
        return parents, tokens, scores
    if num_keep > width * cands:
        raise ValueError(f"num_keep {num_keep} exceeds the {width * cands} candidates")
    n_pad = _next_pow2(width * cands)
    tile_j = min(n_pad, max(16, 4096 // n_pad))
    with _launch_context(beam_scores):
        beam_prune_kernel[(groups,)](
            beam_scores.contiguous(), cand_tokens.contiguous(), cand_logprobs.contiguous(),
            parents, tokens, scores, width, cands, num_keep,
            N_PAD=n_pad, TILE_J=tile_j,
        )  # fmt: skip
    return parents, tokens, scores


def _check_quantized(data: torch.Tensor, qtype: str) -> int:
    """K of quantized rows data [N, row_bytes]; raises on a bad format, dtype or shape."""
    fmt = quant_format(qtype)
    if data.dtype != torch.uint8:
        raise TypeError(f"quantized data must be uint8, got {data.dtype}")
    if data.dim() != 2:
        raise ValueError(f"quantized data must be [N, row_bytes], got {list(data.shape)}")
    return fmt.columns(data.shape[1])  # a multiple of 32 in every format


def quant_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: str,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """See `xllm.ops.reference.quant_linear`; returns x's dtype (accumulates in float32);
    bf16_products is allowed, not used: on CUDA the model runs in bfloat16 anyway.

    The weights are unpacked in the kernel, 32 at a time; no dequantized copy of them is made.
    """
    k = _check_quantized(data, qtype)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] for these {qtype} rows, got {list(x.shape)}")
    n = data.shape[0]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    for name, t in (("data", data), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    m = math.prod(x.shape[:-1])
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    x2 = _last_dim_contiguous(x.reshape(m, k))
    data = _last_dim_contiguous(data)
    bias = bias.contiguous() if bias is not None else None
    use_dot = m >= 16  # tl.dot needs tiles of 16 rows; decode batches broadcast and sum
    wide = use_dot and x.dtype != torch.float32  # float32 (ieee) tiles of 64 x 64 spill
    block_m = min(64 if wide else 32, _next_pow2(m)) if use_dot else _next_pow2(m)
    block_n = 64 if wide else 32
    with _launch_context(x):
        quant_linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x2, data, bias if bias is not None else out, out,
            m, n, k // QUANT_SUB, x2.stride(0), data.stride(0), out.stride(0),
            QTYPE=qtype, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            USE_DOT=use_dot, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def dequantize(data: torch.Tensor, qtype: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """See `xllm.ops.reference.dequantize`; rows must lie in [0, N) (not checked, no sync)."""
    k = _check_quantized(data, qtype)
    if rows is not None:
        if rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"rows must be int32 or int64, got {rows.dtype}")
        if rows.dim() != 1:
            raise ValueError(f"rows must be [R], got {list(rows.shape)}")
        if rows.device != data.device:
            raise ValueError(f"rows is on {rows.device}, data on {data.device}")
        rows = rows.contiguous()
    num_rows = data.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(num_rows, k, dtype=torch.float32, device=data.device)
    if num_rows == 0 or k == 0:
        return out
    data = _last_dim_contiguous(data)
    block_r = min(16, _next_pow2(num_rows))
    with _launch_context(data):
        dequantize_kernel[(triton.cdiv(num_rows, block_r), k // QUANT_SUB)](
            data, rows if rows is not None else data, out, num_rows, data.stride(0), out.stride(0),
            QTYPE=qtype, HAS_ROWS=rows is not None, BLOCK_R=block_r,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- fused layer ops

NORM_BLOCK = 8192  # most elements of a row rms_norm keeps in registers (a power of two)
SILU_BLOCK = 1024  # outputs a silu_mul program writes (a power of two)
ROTARY_ELEMS = 2048  # about the elements (heads * D) a rotary_write_kv program moves
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def _check_devices(anchor: str, tensor: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(f"{name} is on {other.device}, {anchor} on {tensor.device}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.rms_norm`; the output is a new contiguous [T, H] tensor in the
    dtype of x, or of the residual when there is one (the reference norms the residual)."""
    return rms_norm_with(x, weight, eps, residual)


def rms_norm_with(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    block_h: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` with the chunk open: rows wider than block_h (a power of two) take two passes."""
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {list(x.shape)}")
    tokens, width = x.shape
    if weight.shape != (width,):
        raise ValueError(f"weight must be [{width}], got {list(weight.shape)}")
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must be {list(x.shape)} like x, got {list(residual.shape)}")
        if residual.stride(-1) != 1:
            raise ValueError("the residual's last dimension must be contiguous (updated in place)")
    _check_devices("x", x, weight=weight, residual=residual)
    out_dtype = x.dtype if residual is None else residual.dtype
    out = torch.empty(tokens, width, dtype=out_dtype, device=x.device)
    if tokens > 0 and width > 0:
        x = _last_dim_contiguous(x)
        weight = weight.contiguous()
        if block_h is None:
            block_h = min(NORM_BLOCK, _next_pow2(width))
        with _launch_context(x):
            rms_norm_kernel[(tokens,)](
                x, weight, residual if residual is not None else x, out, width, float(eps),
                x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, ONE_PASS=block_h >= width,
                num_warps=min(16, max(1, block_h // 256)),
            )  # fmt: skip
    return out if residual is None else (out, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """See `xllm.ops.reference.silu_mul`: x [..., 2I] (batch dims allowed, as there) -> a new
    contiguous [..., I] in x's dtype; float32 math."""
    _check_float("x", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, 2I], got {list(x.shape)}")
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    tokens = out.numel() // inter if inter else 0
    if tokens == 0:
        return out
    x = _last_dim_contiguous(x.reshape(tokens, 2 * inter))  # a view when the rows allow
    block_i = min(SILU_BLOCK, _next_pow2(inter))
    with _launch_context(x):
        silu_mul_kernel[(tokens, triton.cdiv(inter, block_i))](
            x, out, inter, x.stride(0), inter, BLOCK_I=block_i, num_warps=4
        )
    return out


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
    """See `xllm.ops.reference.rotary_write_kv`: one launch rotates q and k and writes k, v.

    Reads no tensor values on the host (CUDA-graph safe); slots must lie in the cache or be -1
    (not checked).
    """
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(name, t)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, H_kv, D]")
    _, block_size, cache_heads, head_size = k_cache.shape
    if num_heads < 1 or num_kv_heads != cache_heads:
        raise ValueError(
            f"need num_heads >= 1 and num_kv_heads == the cache's H_kv ({cache_heads}), "
            f"got {num_heads}, {num_kv_heads}"
        )
    if head_size % 2:
        raise ValueError(f"the head size must be even for rotate-half, got {head_size}")
    width = (num_heads + 2 * num_kv_heads) * head_size
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be [T, (H + 2 H_kv) D] = [T, {width}], got {list(qkv.shape)}")
    tokens, half = qkv.shape[0], head_size // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (tokens, half):
            raise ValueError(f"{name} must be [{tokens}, {half}], got {list(t.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"slot_mapping must be [{tokens}], got {list(slot_mapping.shape)}")
    _check_devices(
        "qkv", qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    if tokens == 0:
        return
    if qkv.stride(-1) != 1:
        raise ValueError("qkv's last dimension must be contiguous (it is rotated in place)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last dimension must be contiguous")
    cos = _last_dim_contiguous(cos)
    sin = _last_dim_contiguous(sin)
    slot_mapping = slot_mapping.contiguous()
    total_heads = num_heads + 2 * num_kv_heads
    half_pad = _next_pow2(half)
    block_heads = min(_next_pow2(total_heads), max(1, ROTARY_ELEMS // (2 * half_pad)))
    with _launch_context(qkv):
        rotary_write_kv_kernel[(tokens, triton.cdiv(total_heads, block_heads))](
            qkv, cos, sin, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0), sin.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size,
            HALF_PAD=half_pad, BLOCK_HEADS=block_heads, BLOCK_SIZE=block_size,
        )  # fmt: skip
