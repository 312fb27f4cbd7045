"""Qwen2.5-VL: a windowed vision transformer whose merged patch embeddings take the place
of the image placeholder tokens in a Qwen2 decoder with multimodal rotary positions.

An image arrives as patches (`xllm.engine.images`), grouped by 2x2 merge units in row
order; the encoder attends within windows of `window_size` pixels in most blocks and over
the whole image in `fullatt_block_indexes`, then merges each 2x2 unit into one token of the
language model. `mrope_positions` gives the decoder's 3-D positions of a prompt.
"""

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xllm.model.llama import Linear, LlamaForCausalLM, RMSNorm, rotate

VISION_EPS = 1e-6  # the vision tower's RMSNorm epsilon (not in its config)


def mrope_positions(num_tokens: int, images: Iterable[tuple[int, tuple[int, int, int]]],
                    merge_size: int) -> tuple[np.ndarray, int]:
    """The decoder positions [3, num_tokens] (temporal, height, width) of a prompt whose
    images' tokens start at the given offsets with the given patch grids; and the delta
    that later tokens add to their index (their three positions are equal).

    Text counts up by one per token; an image's tokens sit at the running position plus
    their (frame, row, column) in the merged grid, and the text after an image goes on
    from the running position plus the larger side of that grid.
    """
    positions = np.empty((3, num_tokens), dtype=np.int64)
    index = current = 0
    for offset, (t, h, w) in images:
        text = offset - index
        positions[:, index:offset] = np.arange(current, current + text)
        current += text
        rows, cols = h // merge_size, w // merge_size
        grid = np.indices((t, rows, cols)).reshape(3, -1)
        positions[:, offset : offset + grid.shape[1]] = grid + current
        current += max(rows, cols)
        index = offset + grid.shape[1]
    positions[:, index:] = np.arange(current, current + num_tokens - index)
    return positions, current - index


def window_order(grid: tuple[int, int, int], merge_size: int, window: int) -> tuple[np.ndarray,
                                                                                    list[int]]:
    """The order of an image's merge units when windows of `window` x `window` units are laid
    end to end (each window row by row), and the units in each window."""
    t, h, w = grid
    rows, cols = h // merge_size, w // merge_size
    units = np.arange(t * rows * cols).reshape(t, rows, cols)
    order, sizes = [], []
    for frame in units:
        for r in range(0, rows, window):
            for c in range(0, cols, window):
                block = frame[r : r + window, c : c + window].reshape(-1)
                order.append(block)
                sizes.append(block.size)
    return np.concatenate(order), sizes


def patch_positions(grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, column) [N, 2] of each patch, in the processor's order (merge units row by
    row, the patches of a unit row by row)."""
    t, h, w = grid
    m = merge_size
    rows, cols = np.indices((h, w))
    shape = (h // m, m, w // m, m)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=1), (t, 1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lengths: list[int], scale: float) -> torch.Tensor:
    """Full (non-causal) attention within each segment of consecutive tokens; q, k, v
    [N, heads, dim]. Segments of one length run as one batch."""
    out = torch.empty_like(q)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    lengths = np.asarray(lengths)
    for length in np.unique(lengths):
        index = torch.from_numpy(starts[lengths == length][:, None] + np.arange(length))
        index = index.to(q.device)
        qs, ks, vs = (x[index].transpose(1, 2) for x in (q, k, v))  # [segments, heads, L, dim]
        attn = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[index] = attn.transpose(1, 2)
    return out


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3 * self.num_heads, self.head_dim)
        qk = rotate(qkv[:, : 2 * self.num_heads], cos, sin)
        q, k, v = qk[:, : self.num_heads], qk[:, self.num_heads :], qkv[:, 2 * self.num_heads :]
        out = segment_attention(q, k, v, lengths, self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=True)
        self.up_proj = Linear(dim, hidden, bias=True)
        self.down_proj = Linear(hidden, dim, bias=True)
        self.act = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, VISION_EPS)
        self.norm2 = RMSNorm(config.hidden_size, VISION_EPS)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge unit's patches side by side through a 2-layer GELU MLP."""

    def __init__(self, dim: int, out_dim: int, merge_size: int):
        super().__init__()
        self.unit = dim * merge_size**2
        self.ln_q = RMSNorm(dim, VISION_EPS)
        self.mlp = nn.Sequential(Linear(self.unit, self.unit), nn.GELU(),
                                 Linear(self.unit, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.unit))


class PatchEmbed(nn.Module):
    """A Conv3d whose stride is its kernel: one linear map of each flattened patch."""

    def __init__(self, config):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionEncoder(nn.Module):
    """Patches of images -> one embedding per merge unit, in the language model's width."""

    def __init__(self, config):
        super().__init__()
        self.merge_size = config.spatial_merge_size
        self.window = config.window_size // config.spatial_merge_size // config.patch_size
        self.full_blocks = set(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, config.out_hidden_size, self.merge_size)
        self.head_dim = config.hidden_size // config.num_heads
        self.theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The rotary frequencies of one axis (a quarter of a head), in float32 whatever the
        model's dtype."""
        half = self.head_dim // 2
        return 1.0 / self.theta ** (torch.arange(0, half, 2, device=device) / half)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Embeddings [sum of units, out_hidden] of the images whose patches are laid end to
        end in `patches` [N, C * T * P * P], image by image."""
        unit = self.merge_size**2
        order, windows, full, done = [], [], [], 0
        for grid in grids:
            units, sizes = window_order(grid, self.merge_size, self.window)
            order.append(units + done)
            windows += [size * unit for size in sizes]
            full += [grid[1] * grid[2]] * grid[0]
            done += units.size
        order = torch.from_numpy(np.concatenate(order)).to(patches.device)
        positions = np.concatenate([patch_positions(g, self.merge_size) for g in grids])
        freqs = torch.from_numpy(positions).to(patches.device).float()[..., None] * \
            self.inv_freq(patches.device)
        freqs = freqs.flatten(1)  # [N, head_dim / 2]: the row's frequencies, then the column's

        x = self.patch_embed(patches)
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)  # windows laid end to end
        freqs = freqs.view(-1, unit, freqs.shape[-1])[order].flatten(0, 1)
        cos, sin = freqs.cos().unsqueeze(1).to(x.dtype), freqs.sin().unsqueeze(1).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in self.full_blocks else windows)
        return self.merger(x)[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    """The vision encoder and the Qwen2 decoder; `embed_images` runs the encoder, and
    `forward` puts image embeddings in place of their placeholder tokens."""

    def __init__(self, config, max_positions: int):
        super().__init__()
        self.config = config
        self.language = LlamaForCausalLM(config.get_text_config(), max_positions,
                                         tie_embeddings=config.tie_word_embeddings)
        self.visual = VisionEncoder(config.vision_config)
        self.layers = self.language.layers

    def embed_images(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]
                     ) -> torch.Tensor:
        return self.visual(patches, grids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states; rows `image_rows` of the batch take `image_embeds` instead of their
        tokens' embeddings."""
        x = self.language.embed(input_ids)
        if image_rows is not None:
            x[image_rows] = image_embeds.to(x.dtype)
        return self.language.decode(x, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.logits(hidden)

    def kv_block_shape(self, block_size: int) -> tuple[int, int, int]:
        return self.language.kv_block_shape(block_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face names, in both layouts: `visual.*` / `model.*` (the released
        checkpoints) and `model.visual.*` / `model.language_model.*` (transformers 5)."""
        params = dict(self.visual.named_parameters())
        missing = set(params)

        def language() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                short = name.removeprefix("model.")
                if short.startswith("visual."):
                    short = short.removeprefix("visual.")
                    if short not in params:
                        raise KeyError(f"unexpected weight {name}")
                    params[short].data.copy_(tensor.view(params[short].shape))
                    missing.discard(short)
                else:
                    yield short.removeprefix("language_model."), tensor

        self.language.load_weights(language())
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} vision weights, "
                             f"e.g. {min(missing)}")
