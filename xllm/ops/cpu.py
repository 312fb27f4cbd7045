"""The C++ (CPU) kernels of csrc/ behind the reference signatures; checks layouts, then calls.

xllm._C runs the best instruction-set variant of its SIMD kernels that the CPU supports
(`_C.isa()`); XLLM_CPU_ISA=generic|avx2|avx512 forces one at import, `_C.set_isa` later.
"""

import math

import torch
import torch.nn.functional as F

from xllm.ops.decoder import DecoderShape, LayerWeights, LinearWeights
from xllm.ops.panels import PANEL, F32Panels
from xllm.ops.quant import INT8_PANEL, INT8_ZERO, Int8Packed, int8_block_bytes, quant_format

try:
    import xllm._C as _C
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"{error} (pip install -e . builds it)", name=error.name) from error

_INDEX_DTYPES = (torch.int32, torch.int64)


_F32 = torch.float32
_I32 = torch.int32
_KV_DTYPES = (torch.float32, torch.bfloat16)  # the caches' dtypes the kernels read and write
# Up to this many rows of x the C++ skinny GEMM serves float32 linears (it beat F.linear, MKL,
# on every SmolLM2 and Qwen2-7B shape measured: 2 Zen 4 threads, >= 1.07x at 128 rows); more
# rows go to the blocked kernel of quant.cpp (1.1 to 1.4x MKL at 512 rows).
LINEAR_MAX_ROWS = 128


def _require_cpu_f32(name: str, t: torch.Tensor) -> None:
    if t.dtype is not _F32 or not t.is_cpu:
        raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def _caches(k_cache: torch.Tensor, v_cache: torch.Tensor, dims: int, layout: str) -> bool:
    """Checks a pair of contiguous CPU caches of one KV dtype; True for bfloat16."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _KV_DTYPES or not t.is_cpu:
            raise TypeError(f"{name} must be a float32 or bfloat16 CPU tensor, got {t.dtype} "
                            f"on {t.device}")
    if k_cache.dim() != dims or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be {layout}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError("k_cache and v_cache must have the same dtype")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    return k_cache.dtype is torch.bfloat16


def _cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return _caches(k_cache, v_cache, 4, "[num_blocks, block_size, H_kv, D]")


def _int32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype is not _I32:
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"index tensors must be int32, got {t.dtype}")
        t = t.to(_I32)
    return t if t.is_contiguous() else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with its last two dims packed ([T, A, B] rows of A * B floats), any token stride."""
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        t = t.contiguous()
    return t


def _attention_metadata(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three as contiguous int32, checked against each other's batch size."""
    query_start_loc, seq_lens, block_tables = (
        _int32(query_start_loc), _int32(seq_lens), _int32(block_tables))
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc must be [B + 1] and block_tables [B, max_blocks]")
    return query_start_loc, seq_lens, block_tables


def _rotary_inputs(cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                   tokens: int, head_size: int) -> torch.Tensor:
    """Checks the rotary tables [T, D / 2] and the slot mapping [T]; the latter, contiguous."""
    for name, t in (("cos", cos), ("sin", sin)):
        _require_cpu_f32(name, t)
        if t.shape != (tokens, head_size // 2) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [T, D / 2]")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in _INDEX_DTYPES:
        raise ValueError("slot_mapping must be an int32 or int64 [T]")
    return slot_mapping.contiguous()


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See `xllm.ops.reference.paged_attention` (q float32; caches float32 or bfloat16)."""
    _require_cpu_f32("q", q)
    kv_bf16 = _cache_pair(k_cache, v_cache)
    num_tokens, num_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_size = k_cache.shape
    if cache_head_size != head_size:
        raise ValueError("q and the caches disagree on the head size")
    q = _rows(q)
    query_start_loc, seq_lens, block_tables = _attention_metadata(
        query_start_loc, seq_lens, block_tables)
    num_seqs, max_blocks = block_tables.shape
    out = torch.empty((num_tokens, num_heads, head_size), dtype=_F32)
    _C.paged_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
        num_tokens, num_seqs, num_heads, num_kv_heads, head_size,
        num_blocks, block_size, max_blocks, scale, kv_bf16,
    )  # fmt: skip
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """See `xllm.ops.reference.write_kv` (key, value float32; caches float32 or bfloat16)."""
    _require_cpu_f32("key", key)
    _require_cpu_f32("value", value)
    kv_bf16 = _cache_pair(k_cache, v_cache)
    num_blocks, block_size, num_kv_heads, head_size = k_cache.shape
    num_tokens = key.shape[0]
    if key.shape != (num_tokens, num_kv_heads, head_size) or value.shape != key.shape:
        raise ValueError("key and value must be [T, H_kv, D] matching the caches")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError("slot_mapping must be [T]")
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    key, value, slot_mapping = _rows(key), _rows(value), slot_mapping.contiguous()
    _C.write_kv(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16, slot_mapping.data_ptr(),
        slot_mapping.dtype == torch.int64, num_tokens, num_kv_heads * head_size,
        num_blocks * block_size,
    )  # fmt: skip


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """See `xllm.ops.reference.copy_blocks` (float32 or bfloat16 caches)."""
    _caches(k_cache, v_cache, 5, "[num_layers, num_blocks, block_size, H_kv, D]")
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [P, 2], got {list(block_mapping.shape)}")
    if block_mapping.dtype not in _INDEX_DTYPES or not block_mapping.is_cpu:
        raise TypeError(
            f"block_mapping must be an int32 or int64 CPU tensor, got {block_mapping.dtype} "
            f"on {block_mapping.device}"
        )
    block_mapping = block_mapping.contiguous()
    num_layers, num_blocks = k_cache.shape[:2]
    _C.copy_blocks(
        k_cache.data_ptr(), v_cache.data_ptr(), block_mapping.data_ptr(),
        block_mapping.dtype == torch.int64, block_mapping.shape[0], num_layers, num_blocks,
        math.prod(k_cache.shape[2:]) * k_cache.element_size(),
    )  # fmt: skip


def _logit_rows(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """2-D CPU logits as float32 rows of contiguous values, and their row stride."""
    if logits.device.type != "cpu" or logits.dim() != 2:
        raise ValueError("logits must be a 2-D CPU tensor")
    if logits.dtype != torch.float32:
        logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, logits.stride(0) if logits.shape[0] > 0 else logits.shape[1]


def topk_logprobs(
    logits: torch.Tensor, k: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.topk_logprobs`."""
    logits, ld = _logit_rows(logits)
    rows, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    if token_ids.shape != (rows,):
        raise ValueError("token_ids must be [N]")
    token_ids = token_ids.to(torch.int64).contiguous()
    values = torch.empty((rows, k), dtype=torch.float32)
    indices = torch.empty((rows, k), dtype=torch.int64)
    chosen = torch.empty((rows,), dtype=torch.float32)
    _C.topk_logprobs(
        logits.data_ptr(), ld, rows, vocab, k,
        token_ids.data_ptr(), values.data_ptr(), indices.data_ptr(), chosen.data_ptr(),
    )  # fmt: skip
    return values, indices, chosen


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """See `xllm.ops.reference.argmax`."""
    logits, ld = _logit_rows(logits)
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column")
    out = torch.empty(rows, dtype=torch.int64)
    _C.argmax_rows(logits.data_ptr(), ld, rows, vocab, out.data_ptr())
    return out


def beam_prune(
    beam_scores: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    num_keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.beam_prune`."""
    groups, width, cands = cand_tokens.shape
    if beam_scores.shape != (groups, width) or cand_logprobs.shape != cand_tokens.shape:
        raise ValueError("beam_scores must be [G, W], cand_tokens and cand_logprobs [G, W, C]")
    if not 0 <= num_keep <= width * cands:
        raise ValueError(f"num_keep must be in 0..{width * cands}, got {num_keep}")
    beam_scores = beam_scores.float().contiguous()
    cand_logprobs = cand_logprobs.float().contiguous()
    cand_tokens = cand_tokens.to(torch.int64).contiguous()
    parents = torch.empty((groups, num_keep), dtype=torch.int64)
    tokens = torch.empty((groups, num_keep), dtype=torch.int64)
    scores = torch.empty((groups, num_keep), dtype=torch.float32)
    _C.beam_prune(
        beam_scores.data_ptr(), cand_tokens.data_ptr(), cand_logprobs.data_ptr(),
        groups, width, cands, num_keep, parents.data_ptr(), tokens.data_ptr(), scores.data_ptr(),
    )  # fmt: skip
    return parents, tokens, scores


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """See `xllm.ops.reference.linear`: the C++ skinny GEMM for up to LINEAR_MAX_ROWS rows,
    the blocked kernel of the quantized formats (float32 rows as its "f32" format) for more,
    and for any number where bfloat16 products are allowed (it decides where they pay).

    Kept thin (a decode step calls it once per projection, ~3 us here against ~2 us for
    F.linear). Other dtypes, non-contiguous tensors, tensors off the CPU and K = 0 (or, past
    LINEAR_MAX_ROWS, K not a multiple of 32) go to F.linear, which computes the same thing
    (or raises on bad shapes).
    """
    n, k = weight.shape
    if (
        k == 0
        or x.dtype is not _F32
        or weight.dtype is not _F32
        or not weight.is_cpu
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or x.shape[-1] != k
    ):
        return F.linear(x, weight, bias)
    m = x.numel() // k
    if bias is not None:
        if bias.dtype is not _F32 or not bias.is_cpu or bias.shape != (n,):
            return F.linear(x, weight, bias)
        bias = bias.contiguous()
    out = torch.empty(m, n, dtype=_F32)  # int sizes: ~0.5 us cheaper than a tuple
    bias_ptr = 0 if bias is None else bias.data_ptr()
    if k % 32 == 0 and (bf16_products or m > LINEAR_MAX_ROWS):
        _C.quant_linear(x.data_ptr(), weight.data_ptr(), "f32", 4 * k, bias_ptr, out.data_ptr(),
                        m, n, k, bf16_products)
    elif m <= LINEAR_MAX_ROWS:
        _C.linear(x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), m, n, k)
    else:
        return F.linear(x, weight, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def _quant_rows(data: torch.Tensor, qtype: str) -> int:
    """K of the quantized rows data [N, row_bytes]; checks their layout."""
    if data.dtype is not torch.uint8 or not data.is_cpu or data.dim() != 2:
        raise TypeError(f"quantized rows must be a 2-D uint8 CPU tensor, got {data.dtype}")
    if not data.is_contiguous():
        raise ValueError("quantized rows must be contiguous")
    return quant_format(qtype).columns(data.shape[1])


def _bias_arg(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A linear kernel's bias checked ([n], float32 on the CPU) and made contiguous."""
    if bias is None:
        return None
    _require_cpu_f32("bias", bias)
    if bias.shape != (n,):
        raise ValueError(f"bias must be [{n}]")
    return bias.contiguous()


def quant_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: str,
    bias: torch.Tensor | None = None,
    bf16_products: bool = False,
) -> torch.Tensor:
    """See `xllm.ops.reference.quant_linear`: the rows unpacked in registers, for any number
    of rows of x (beats dequantizing into F.linear, MKL, at every size measured).

    Kept thin, like `linear` (a decode step calls it once per projection): the C++ side
    checks the format and that the rows hold x's K weights.
    """
    if data.dtype is not torch.uint8 or data.dim() != 2 or not data.is_cpu \
            or not data.is_contiguous():
        _quant_rows(data, qtype)  # raises
    _require_cpu_f32("x", x)
    n, k = data.shape[0], x.shape[-1]
    m = x.numel() // k if k else 0
    bias = _bias_arg(bias, n)
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty(m, n, dtype=_F32)
    _C.quant_linear(
        x.data_ptr(), data.data_ptr(), qtype, data.shape[1],
        0 if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, bf16_products,
    )  # fmt: skip
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def _check_int8(packed: Int8Packed) -> None:
    data = packed.data
    if packed.qtype not in INT8_ZERO or data.dtype is not torch.uint8 or not data.is_cpu \
            or not data.is_contiguous() or data.shape != (
                -(-packed.n // INT8_PANEL), packed.k // 32, int8_block_bytes(packed.qtype)):
        raise ValueError("int8 weights must come from xllm.ops.quant.pack_int8")


def int8_linear(
    x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """See `xllm.ops.reference.int8_linear`: csrc/int8_linear.cpp (vpdpbusd with AVX-512 VNNI,
    a portable loop of the same sums elsewhere)."""
    _check_int8(packed)
    return _packed_linear(x, packed, bias, lambda x_ptr, bias_ptr, out_ptr, m: _C.int8_linear(
        x_ptr, packed.data.data_ptr(), packed.qtype, bias_ptr, out_ptr, m, packed.n, packed.k))


def _packed_linear(x: torch.Tensor, packed: Int8Packed | F32Panels, bias: torch.Tensor | None,
                   run) -> torch.Tensor:
    """Checks x [..., k] and the bias of packed weights [n, k], then `run(x, bias or 0, out,
    m)` (pointers) fills out [m, n]."""
    _require_cpu_f32("x", x)
    n, k = packed.n, packed.k
    if x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}]")
    m = math.prod(x.shape[:-1])
    bias = _bias_arg(bias, n)
    x = x.contiguous()
    out = torch.empty(m, n, dtype=_F32)
    run(x.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), m)
    return out.view(*x.shape[:-1], n)


def _check_panels(panels: F32Panels) -> None:
    data = panels.data
    if data.dtype is not _F32 or not data.is_cpu or not data.is_contiguous() \
            or data.shape != (-(-panels.n // PANEL), panels.k, PANEL):
        raise ValueError("float32 panels must come from xllm.ops.panels.pack_panels")


def panel_linear(
    x: torch.Tensor, panels: F32Panels, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """See `xllm.ops.reference.panel_linear`: csrc/panel_linear.cpp."""
    _check_panels(panels)
    return _packed_linear(x, panels, bias, lambda x_ptr, bias_ptr, out_ptr, m: _C.panel_linear(
        x_ptr, panels.data.data_ptr(), bias_ptr, out_ptr, m, panels.n, panels.k))


def dequantize(
    data: torch.Tensor, qtype: str, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """See `xllm.ops.reference.dequantize`."""
    k = _quant_rows(data, qtype)
    if rows is not None:
        if rows.dim() != 1 or rows.dtype not in _INDEX_DTYPES or not rows.is_cpu:
            raise TypeError("rows must be a 1-D int64 CPU tensor")
        rows = rows.to(torch.int64).contiguous()
    count = data.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(count, k, dtype=_F32)
    _C.dequantize(
        data.data_ptr(), qtype, data.shape[1], 0 if rows is None else rows.data_ptr(), count,
        data.shape[0], out.data_ptr(), k,
    )  # fmt: skip
    return out


def _row_stride(t: torch.Tensor, name: str) -> int:
    """Row stride of a 2-D float32 CPU tensor whose rows are contiguous."""
    _require_cpu_f32(name, t)
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"{name} must be 2-D with contiguous rows")
    return t.stride(0)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `xllm.ops.reference.rms_norm` (float32; rows of x and residual contiguous)."""
    tokens, hidden = x.shape
    x_stride = _row_stride(x, "x")
    _require_cpu_f32("weight", weight)
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{hidden}]")
    res_stride = 0
    if residual is not None:
        res_stride = _row_stride(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError("residual must have x's shape")
    out = torch.empty(tokens, hidden, dtype=_F32)
    _C.rms_norm(
        x.data_ptr(), x_stride, 0 if residual is None else residual.data_ptr(), res_stride,
        weight.data_ptr(), out.data_ptr(), tokens, hidden, eps,
    )  # fmt: skip
    return out if residual is None else (out, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """See `xllm.ops.reference.silu_mul` (float32; rows of x contiguous)."""
    tokens, width = x.shape
    if width % 2:
        raise ValueError("x must be [T, 2I]")
    out = torch.empty(tokens, width // 2, dtype=_F32)
    _C.silu_mul(x.data_ptr(), _row_stride(x, "x"), out.data_ptr(), tokens, width // 2)
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
    """See `xllm.ops.reference.rotary_write_kv` (qkv float32; caches float32 or bfloat16)."""
    kv_bf16 = _cache_pair(k_cache, v_cache)
    num_blocks, block_size, cache_kv_heads, head_size = k_cache.shape
    tokens = qkv.shape[0]
    stride = _row_stride(qkv, "qkv")
    if cache_kv_heads != num_kv_heads or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_size:
        raise ValueError("qkv must be [T, (H + 2 H_kv) D] matching the caches")
    if head_size % 2:
        raise ValueError("the head size must be even")
    slot_mapping = _rotary_inputs(cos, sin, slot_mapping, tokens, head_size)
    _C.rotary_write_kv(
        qkv.data_ptr(), stride, cos.data_ptr(), sin.data_ptr(), tokens, num_heads, num_kv_heads,
        head_size, k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16, slot_mapping.data_ptr(),
        slot_mapping.dtype == torch.int64, num_blocks * block_size,
    )  # fmt: skip


def decoder_stack(shape: DecoderShape, layers: list[LayerWeights]) -> "DecoderStack | None":
    """A `DecoderStack` of these weights, or None where its kernel does not take them (not
    float32 on the CPU, or float rows whose K is not a multiple of 32)."""
    tensors = [t for layer in layers for t in (layer.input_norm, layer.post_norm)]
    linears = [w for layer in layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    tensors += [w.bias for w in linears if w.bias is not None]
    tensors += [w.weight for w in linears if isinstance(w.weight, torch.Tensor) and w.qtype is None]
    if any(t.dtype is not _F32 or not t.is_cpu for t in tensors):
        return None
    if any(w.qtype is None and w.in_features % 32 for w in linears):
        return None
    return DecoderStack(shape, layers)


class DecoderStack:
    """Every decoder layer in one C++ call (csrc/decoder.cpp): the kernels of a layer run back
    to back without Python, tensor allocations or the GIL between them; the hidden states
    equal the layer-by-layer path's bit for bit. Holds raw pointers to the weights: build
    a new one when they are replaced."""

    def __init__(self, shape: DecoderShape, layers: list[LayerWeights]):
        self.shape = shape
        self._keep = layers  # the weights whose pointers the C++ side holds
        specs = [(self._vector(layer.input_norm, shape.hidden), self._linear(layer.qkv),
                  self._linear(layer.o), self._vector(layer.post_norm, shape.hidden),
                  self._linear(layer.gate_up), self._linear(layer.down)) for layer in layers]
        self._stack = _C.DecoderStack(*shape, specs, LINEAR_MAX_ROWS)

    @staticmethod
    def _vector(t: torch.Tensor, size: int) -> int:
        _require_cpu_f32("norm weight", t)
        if t.shape != (size,) or not t.is_contiguous():
            raise ValueError(f"norm weights must be contiguous [{size}]")
        return t.data_ptr()

    @staticmethod
    def _linear(w: LinearWeights) -> tuple:
        layout = "int8" if isinstance(w.weight, Int8Packed) else (
            "panels" if isinstance(w.weight, F32Panels) else "rows")
        n, k = w.weight.n if layout != "rows" else w.weight.shape[0], w.in_features
        if layout != "rows":
            (_check_int8 if layout == "int8" else _check_panels)(w.weight)
            if w.weight.k != k:
                raise ValueError(f"packed weights do not hold {k} inputs")
            qtype = w.weight.qtype if layout == "int8" else "f32"
            row_bytes = 0  # the packed layout
        elif w.qtype is None:  # float rows, the formats' "f32" past LINEAR_MAX_ROWS
            _require_cpu_f32("weight", w.weight)
            if w.weight.shape != (n, k) or not w.weight.is_contiguous() or k % 32:
                raise ValueError("float rows must be contiguous [N, K], K a multiple of 32")
            qtype, row_bytes = "f32", 4 * k
        else:
            if _quant_rows(w.weight, w.qtype) != k:
                raise ValueError(f"{w.qtype} rows do not hold {k} weights")
            qtype, row_bytes = w.qtype, w.weight.shape[1]
        bias = 0
        if w.bias is not None:
            _require_cpu_f32("bias", w.bias)
            if w.bias.shape != (n,) or not w.bias.is_contiguous():
                raise ValueError(f"bias must be a contiguous [{n}]")
            bias = w.bias.data_ptr()
        data = w.weight if layout == "rows" else w.weight.data
        return data.data_ptr(), qtype, row_bytes, bias, n, k, w.bf16_products, layout

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] (last layer's output plus the residual stream) of the
        input embeddings x [T, hidden]; arguments as `AttentionContext` holds them."""
        shape = self.shape
        tokens = x.shape[0]
        _require_cpu_f32("x", x)
        if x.shape != (tokens, shape.hidden):
            raise ValueError(f"x must be [T, {shape.hidden}]")
        slot_mapping = _rotary_inputs(cos, sin, slot_mapping, tokens, shape.head_size)
        query_start_loc, seq_lens, block_tables = _attention_metadata(
            query_start_loc, seq_lens, block_tables)
        num_seqs, max_blocks = block_tables.shape
        if len(kv_caches) != len(self._keep):
            raise ValueError(f"{len(self._keep)} layers need as many KV caches")
        kv_bf16 = {_cache_pair(*pair) for pair in kv_caches}
        if len(kv_bf16) > 1:
            raise TypeError("every layer's KV cache must have the same dtype")
        num_blocks, block_size, kv_heads, head_size = kv_caches[0][0].shape
        if (kv_heads, head_size) != (shape.kv_heads, shape.head_size):
            raise ValueError("the KV caches disagree with the decoder's heads")
        if any(k.shape != kv_caches[0][0].shape for k, _ in kv_caches):
            raise ValueError("every layer's KV cache must have the same shape")
        x = x.contiguous()
        out = torch.empty(tokens, shape.hidden, dtype=_F32)
        self._stack.run(
            x.data_ptr(), out.data_ptr(), tokens, cos.data_ptr(), sin.data_ptr(),
            slot_mapping.data_ptr(), slot_mapping.dtype == torch.int64,
            query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(), num_seqs,
            max_blocks, block_size, num_blocks * block_size,
            [k.data_ptr() for k, _ in kv_caches], [v.data_ptr() for _, v in kv_caches],
            kv_bf16.pop(),
        )  # fmt: skip
        return out
