"""The Llama architecture over a paged KV cache; Qwen2 is Llama with q/k/v biases.

The model works on a flat batch: token ids and positions of every scheduled
sequence laid end to end. Attention metadata comes from `model.context`.
Positions are [T], or [3, T] (temporal, height, width) for a model with
multimodal rotary sections (Qwen2.5-VL's M-RoPE).

The decoder calls its submodules' `forward` directly: `nn.Module.__call__` costs about
3 us, and a decode step of a 30-layer model would make some 270 of those calls.
"""

import logging
from collections.abc import Callable

import torch
from torch import nn

from xllm import ops
from xllm.model.context import get_context
from xllm.ops.decoder import DecoderShape, LayerWeights, LinearWeights
from xllm.ops.panels import F32Panels, pack_panels
from xllm.ops.quant import INT8_FORMATS, Int8Packed, QuantizedTensor, pack_int8, quantize_int8

logger = logging.getLogger(__name__)


def hold_quantized(module: nn.Module, weight: QuantizedTensor, shape: tuple[int, int]) -> None:
    """Make `module` hold `weight` (a `qdata` buffer and `qtype`) instead of its float weight."""
    if weight.shape != shape:
        raise ValueError(f"quantized weight {weight.shape} for {type(module).__name__} {shape}")
    module.weight = None
    module.qtype = weight.qtype
    module.register_buffer("qdata", weight.data)


class Linear(nn.Linear):
    """nn.Linear whose product runs through `ops.linear` (the C++ skinny GEMM on the CPU),
    or through `ops.quant_linear` once `quantize` gave it quantized rows instead of weight.
    `bf16_products` (see `allow_bf16_products`) lets the kernels multiply in bfloat16; `int8`
    (see `allow_int8_products`) holds the rows packed for `ops.int8_linear` instead, `panels`
    (see `pack_float_linears`) the float32 weight packed for `ops.panel_linear`."""

    qtype: str | None = None
    bf16_products: bool = False
    int8: Int8Packed | None = None
    panels: F32Panels | None = None

    def quantize(self, weight: QuantizedTensor) -> None:
        """Serve `weight` (quantized rows [out, in]) from now on; the float weight is freed."""
        hold_quantized(self, weight, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return ops.int8_linear(x, self.int8, self.bias)
        if self.panels is not None:
            return ops.panel_linear(x, self.panels, self.bias)
        if self.qtype is not None:
            return ops.quant_linear(x, self.qdata, self.qtype, self.bias, self.bf16_products)
        return ops.linear(x, self.weight, self.bias, self.bf16_products)


class Embedding(nn.Embedding):
    """nn.Embedding whose table may be quantized rows (`quantize`), read by `ops.dequantize`."""

    qtype: str | None = None

    def quantize(self, weight: QuantizedTensor) -> None:
        hold_quantized(self, weight, (self.num_embeddings, self.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [..., dim]: float32 when quantized, else the table's dtype."""
        if self.qtype is not None:
            rows = ops.dequantize(self.qdata, self.qtype, ids.reshape(-1))
            return rows.view(*ids.shape, self.embedding_dim)
        return super().forward(ids)


def quantize_linears(model: nn.Module) -> int:
    """Weight-only int8 (per output row) for every float Linear whose input size allows it;
    returns how many were quantized."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.qtype is None:
            if module.in_features % 32:
                logger.info("%s stays unquantized: %d inputs", name, module.in_features)
                continue
            module.quantize(quantize_int8(module.weight.data))
            count += 1
    return count


def forget_stacks(model: nn.Module) -> None:
    """Drop the decoder stacks built so far: they hold the linears' flags and weights."""
    for module in model.modules():
        if isinstance(module, LlamaForCausalLM):
            module._stack = None


def allow_bf16_products(model: nn.Module) -> int:
    """Let every Linear's kernel multiply x and W rounded to bfloat16, summing in float32,
    where that is faster (torch's "medium" float32 matmul precision); returns how many."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.bf16_products = True
    forget_stacks(model)
    return len(linears)


def allow_int8_products(model: nn.Module) -> int:
    """Int8 products ("low" matmul precision), as llama.cpp multiplies its formats: every
    Linear with q8_0, q4_0, q4_1 or int8 rows keeps them packed for `ops.int8_linear` (x
    rounded to int8 per block of 32) instead; the others get bfloat16 products. Returns how
    many."""
    allow_bf16_products(model)
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.qtype in INT8_FORMATS:
            module.int8 = pack_int8(QuantizedTensor(module.qtype, module.qdata))
            module.qdata = None  # the packed rows replace them
            count += 1
    return count


def pack_float_linears(model: nn.Module) -> int:
    """Every float32 Linear (without bfloat16 products) keeps its weight packed in panels for
    `ops.panel_linear`, the CPU's float32 GEMM; the rows are freed, except a tied LM head's,
    which are the embedding's. Returns how many."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.qtype is None and not module.bf16_products \
                and module.weight.dtype == torch.float32:
            module.panels = pack_panels(module.weight)
            if id(module.weight) not in tables:
                module.weight = None
            count += 1
    forget_stacks(model)
    return count


def move_weights(model: nn.Module,
                 place: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> int:
    """Hand every weight tensor of the model (parameters, buffers, packed int8 rows and
    float32 panels), once each and in the model's order, to `place`, and hold what it returns
    instead (tied weights stay tied). Returns the bytes moved."""
    holders: dict[int, list[Callable[[torch.Tensor], None]]] = {}
    tensors: dict[int, torch.Tensor] = {}

    def hold(tensor: torch.Tensor | None, put: Callable[[torch.Tensor], None]) -> None:
        if tensor is not None:
            tensors.setdefault(id(tensor), tensor)
            holders.setdefault(id(tensor), []).append(put)

    for module in model.modules():
        for param in module.parameters(recurse=False):
            hold(param, lambda t, p=param: setattr(p, "data", t))
        for name, buffer in module.named_buffers(recurse=False):
            hold(buffer, lambda t, m=module, n=name: setattr(m, n, t))
        for packed in (getattr(module, "int8", None), getattr(module, "panels", None)):
            if packed is not None:
                hold(packed.data, lambda t, p=packed: setattr(p, "data", t))
    for key, moved in zip(tensors, place(list(tensors.values()))):
        for put in holders[key]:
            put(moved)
    forget_stacks(model)
    return sum(t.numel() * t.element_size() for t in tensors.values())


# Model types whose q, k and v projections carry biases.
QKV_BIAS = {"qwen2", "qwen2_5_vl_text"}


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table.

    With `mrope_section` in the config's rope parameters (M-RoPE), frequency i of a token
    comes from its temporal, height or width position, as the section i falls in says.
    """

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope_type == "default":
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq.double())
        self.register_buffer("cos", (freqs.cos() * scaling).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).float(), persistent=False)
        # M-RoPE: which of the 3 positions each frequency reads ([head_dim / 2]), or None.
        sections = rope.get("mrope_section")
        section_of = None
        if sections:
            section_of = torch.arange(len(sections)).repeat_interleave(torch.tensor(sections)) % 3
        self.register_buffer("section_of", section_of, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim / 2] of each token's position ([T], or [3, T])."""
        if positions.dim() == 1:
            return self.cos[positions], self.sin[positions]
        columns = torch.arange(self.cos.shape[1], device=positions.device)
        rows = positions[self.section_of]  # [head_dim / 2, T]: each frequency's position
        return self.cos[rows, columns[:, None]].T.contiguous(), \
            self.sin[rows, columns[:, None]].T.contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] (rotate-half layout) by the looked-up angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // self.num_heads
        )
        self.layer_index = layer_index
        self.scale = self.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        bias = config.model_type in QKV_BIAS or getattr(config, "attention_bias", False)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x)
        ctx = get_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_index]
        ops.rotary_write_kv(qkv, cos, sin, self.num_heads, self.num_kv_heads, k_cache, v_cache,
                            ctx.slot_mapping)
        q = qkv[:, : self.sizes[0]].view(tokens, self.num_heads, self.head_dim)
        out = ops.paged_attention(
            q, k_cache, v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, self.scale
        )
        return self.o_proj.forward(out.view(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = Linear(self.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(ops.silu_mul(self.gate_up_proj.forward(x)))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm of x [..., H]; with a residual [T, H], of residual + x, which the residual
        becomes (in place): returns (normed, residual)."""
        if residual is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        return ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): the first layer starts the
        stream (residual None), each next one adds its input to it inside its first norm."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.forward(x, residual)
        h = self.self_attn.forward(h, cos, sin)
        h, residual = self.post_attention_layernorm.forward(h, residual)
        return self.mlp.forward(h), residual


class LlamaForCausalLM(nn.Module):
    """Llama / Qwen2 decoder; `forward` gives hidden states, `logits` the vocabulary scores.

    `tie_embeddings` (default: the config's `tie_word_embeddings`) is for a decoder inside
    a multimodal model, whose text config does not carry it."""

    def __init__(self, config, max_positions: int, tie_embeddings: bool | None = None):
        super().__init__()
        if tie_embeddings is None:
            tie_embeddings = config.tie_word_embeddings
        self.tie_embeddings = tie_embeddings
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._stack = None  # (backend, its decoder-stack kernel or None), see _decoder_stack

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decode(self.embed(input_ids), positions)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of input_ids in the model's dtype."""
        return self.embed_tokens(input_ids).to(self.norm.weight.dtype)

    def decode(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of the input embeddings x [T, hidden] at their positions: in one
        call where x's backend has a decoder-stack kernel, else layer by layer."""
        cos, sin = self.rotary.lookup(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        stack = self._decoder_stack(x)
        if stack is not None:
            ctx = get_context()
            return stack(x, cos, sin, ctx.slot_mapping, ctx.query_start_loc, ctx.seq_lens,
                         ctx.block_tables, ctx.kv_caches)
        residual = None
        for layer in self.layers:
            x, residual = layer.forward(x, residual, cos, sin)
        return x + residual

    def _decoder_stack(self, x: torch.Tensor):
        """The decoder-stack kernel of x's backend (None where it has none), built on first
        use; weights loaded later (`load_weights`) start over."""
        backend = ops.backend_for(x)
        if self._stack is None or self._stack[0] is not backend:
            self._stack = (backend, ops.decoder_stack(x, self._shape(), self._layer_weights()))
        return self._stack[1]

    def _shape(self) -> DecoderShape:
        attn, config = self._attn(0), self.config
        return DecoderShape(config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                            self.layers[0].mlp.intermediate, config.rms_norm_eps, attn.scale)

    def _layer_weights(self) -> list[LayerWeights]:
        def weights(linear: Linear) -> LinearWeights:
            weight = linear.int8 or linear.panels or (
                linear.weight if linear.qtype is None else linear.qdata)
            return LinearWeights(weight, linear.qtype, linear.bias, linear.in_features,
                                 linear.bf16_products)

        return [LayerWeights(layer.input_layernorm.weight, weights(layer.self_attn.qkv_proj),
                             weights(layer.self_attn.o_proj), layer.post_attention_layernorm.weight,
                             weights(layer.mlp.gate_up_proj), weights(layer.mlp.down_proj))
                for layer in self.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def kv_block_shape(self, block_size: int) -> tuple[int, int, int]:
        """The shape of one layer's K (or V) cache block: [block_size, kv heads, head_dim]."""
        attn = self._attn(0)
        return (block_size, attn.num_kv_heads, attn.head_dim)

    def load_weights(self, weights) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up. `QuantizedTensor`s
        stay quantized (see `_load_quantized`)."""
        self._stack = None
        params = dict(self.named_parameters())  # a tied lm_head is the embedding's parameter
        missing = set()
        for name in params:
            if ".qkv_proj." in name:
                missing.update(f"{name}:{proj}" for proj in ("q_proj", "k_proj", "v_proj"))
            elif ".gate_up_proj." in name:
                missing.update(f"{name}:{proj}" for proj in ("gate_proj", "up_proj"))
            else:
                missing.add(name)
        quantized: dict[str, dict[int, QuantizedTensor]] = {}  # target -> first row -> rows
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_embeddings):
                continue
            target, offset = self._target(name)
            if target not in params:
                raise KeyError(f"unexpected weight {name}")
            missing.discard(name if target == name else f"{target}:{name.split('.')[-2]}")
            if isinstance(tensor, QuantizedTensor):
                quantized.setdefault(target, {})[offset] = tensor
            else:
                params[target].data[offset : offset + tensor.shape[0]].copy_(tensor)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {min(missing)}")
        for target, parts in quantized.items():
            self._load_quantized(target, parts, params[target])

    def _target(self, name: str) -> tuple[str, int]:
        """The parameter a checkpoint weight goes to, and its first row there (q/k/v and
        gate/up are fused)."""
        parts = name.split(".")
        proj = parts[-2] if len(parts) >= 2 else ""
        if proj in ("q_proj", "k_proj", "v_proj"):
            sizes = self._attn(int(parts[1])).sizes
            index = ("q_proj", "k_proj", "v_proj").index(proj)
            return name.replace(proj, "qkv_proj"), sum(sizes[:index])
        if proj in ("gate_proj", "up_proj"):
            offset = self.config.intermediate_size if proj == "up_proj" else 0
            return name.replace(proj, "gate_up_proj"), offset
        return name, 0

    def _load_quantized(self, target: str, parts: dict[int, QuantizedTensor], weight) -> None:
        """Quantized rows for `target`, by first row: served quantized when they cover the
        weight in one format (a tied LM head shares the embedding's rows), else dequantized
        into the float weight."""
        module = self.get_submodule(target.removesuffix(".weight"))
        ordered = [parts[offset] for offset in sorted(parts)]
        rows = sum(part.data.shape[0] for part in ordered)
        if len({part.qtype for part in ordered}) == 1 and rows == weight.shape[0]:
            quantized = QuantizedTensor(ordered[0].qtype, torch.cat([p.data for p in ordered]))
            module.quantize(quantized)
            if module is self.embed_tokens and self.tie_embeddings:
                self.lm_head.quantize(quantized)
            return
        logger.info("%s: %d parts in formats %s, dequantized", target, len(parts),
                    sorted({p.qtype for p in ordered}))
        for offset, part in parts.items():
            rows = ops.dequantize(part.data, part.qtype)
            weight.data[offset : offset + rows.shape[0]] = rows

    def _attn(self, index: int) -> Attention:
        return self.layers[index].self_attn
