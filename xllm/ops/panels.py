"""Float32 weights packed in panels for the CPU's float32 GEMM (csrc/panel_linear.cpp)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PANEL = 32  # W rows per panel


@dataclass
class F32Panels:
    """W [n, k] in float32, packed: data [ceil(n / 32), k, 32], panel p holding rows 32p ..
    32p + 31 column by column (data[p, c, j] = W[32p + j, c]); rows past n are zeros."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


def pack_panels(weight: torch.Tensor) -> F32Panels:
    """W [n, k] (float32) packed in panels (see `F32Panels`); the same weights."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"panels hold float32 [n, k] weights, not {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % PANEL))
    panels = padded.view(padded.shape[0] // PANEL, PANEL, k).transpose(1, 2).contiguous()
    return F32Panels(panels, n, k)


def unpack_panels(panels: F32Panels) -> torch.Tensor:
    """W [n, k] back from its panels."""
    return panels.data.transpose(1, 2).reshape(-1, panels.k)[: panels.n]
