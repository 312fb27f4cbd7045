"""One function per kernel; each picks Triton (CUDA), C++ (CPU) or the torch reference.

The choice follows the tensors' device: CUDA tensors go to the Triton kernels,
CPU tensors to the C++ kernels when the extension is built, else to the
reference. A backend that is not installed (the extension not built, triton
missing) falls back to the reference with one logged warning; one that is
installed but fails to import raises, since serving slowly through the
reference would hide a broken build. `use_backend("reference" | "cpp" |
"triton")` overrides the choice for tests and benchmarks.
"""

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

import torch

from xllm.ops import reference

logger = logging.getLogger(__name__)

_override: str | None = None
_modules: dict[str, ModuleType | None] = {}
_MODULE_NAMES = {"cpp": "xllm.ops.cpu", "triton": "xllm.ops.cuda"}


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(_MODULE_NAMES[name])
        except ModuleNotFoundError as error:
            logger.warning("%s kernels unavailable, the torch reference serves: %s", name, error)
            _modules[name] = None
    return _modules[name]


def available(name: str) -> bool:
    """Whether a backend ("reference", "cpp", "triton") can run here."""
    return name == "reference" or _load(name) is not None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend inside the block (None restores the automatic choice)."""
    global _override
    if name is not None and not available(name):
        raise RuntimeError(f"kernel backend {name!r} is not available")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The module whose kernels serve tensors on this device."""
    if _override is not None:
        return reference if _override == "reference" else _load(_override)
    name = "triton" if tensor.is_cuda else "cpp"
    return _load(name) or reference


def paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale):
    """See `reference.paged_attention`."""
    return backend_for(q).paged_attention(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale
    )


def write_kv(key, value, k_cache, v_cache, slot_mapping):
    """See `reference.write_kv`."""
    return backend_for(key).write_kv(key, value, k_cache, v_cache, slot_mapping)


def copy_blocks(k_cache, v_cache, block_mapping):
    """See `reference.copy_blocks`."""
    return backend_for(k_cache).copy_blocks(k_cache, v_cache, block_mapping)


def topk_logprobs(logits, k, token_ids):
    """See `reference.topk_logprobs`."""
    return backend_for(logits).topk_logprobs(logits, k, token_ids)


def argmax(logits):
    """See `reference.argmax`."""
    return backend_for(logits).argmax(logits)


def beam_prune(beam_scores, cand_tokens, cand_logprobs, num_keep):
    """See `reference.beam_prune`."""
    return backend_for(beam_scores).beam_prune(beam_scores, cand_tokens, cand_logprobs, num_keep)


def linear(x, weight, bias=None, bf16_products=False):
    """See `reference.linear`."""
    return backend_for(x).linear(x, weight, bias, bf16_products)


def quant_linear(x, data, qtype, bias=None, bf16_products=False):
    """See `reference.quant_linear`."""
    return backend_for(x).quant_linear(x, data, qtype, bias, bf16_products)


def int8_linear(x, packed, bias=None):
    """See `reference.int8_linear`."""
    return backend_for(x).int8_linear(x, packed, bias)


def panel_linear(x, panels, bias=None):
    """See `reference.panel_linear`."""
    return backend_for(x).panel_linear(x, panels, bias)


def int8_products_fast() -> bool:
    """Whether the CPU's int8_linear runs its vectorized tile here (AVX-512 VNNI)."""
    cpp = _load("cpp")
    return cpp is not None and cpp._C.int8_products_fast()


def dequantize(data, qtype, rows=None):
    """See `reference.dequantize`."""
    return backend_for(data).dequantize(data, qtype, rows)


def rms_norm(x, weight, eps, residual=None):
    """See `reference.rms_norm`."""
    return backend_for(x).rms_norm(x, weight, eps, residual)


def silu_mul(x):
    """See `reference.silu_mul`."""
    return backend_for(x).silu_mul(x)


def rotary_write_kv(qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping):
    """See `reference.rotary_write_kv`."""
    return backend_for(qkv).rotary_write_kv(
        qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping
    )


def decoder_stack(x, shape, layers):
    """Every decoder layer in one call, on the backend that serves x, where it has such a
    kernel for these weights (`cpu.decoder_stack`); None elsewhere: the caller runs the layers
    one by one, which is the stack's reference. See `xllm.ops.decoder` for the arguments."""
    build = getattr(backend_for(x), "decoder_stack", None)
    return None if build is None else build(shape, layers)
