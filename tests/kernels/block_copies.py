"""Cases of the copy_blocks tests, shared by the C++ and the Triton tests."""

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bytes, so that equality is bitwise (NaN payloads and -0.0 included)."""
    return t.contiguous().view(torch.uint8)


def block_pairs(num_blocks: int, num_pairs: int, ids: torch.dtype, gen: torch.Generator):
    """[P, 2] (src, dst): distinct destinations, sources drawn (with repeats) from the rest."""
    perm = torch.randperm(num_blocks, generator=gen)
    dst, others = perm[:num_pairs], perm[num_pairs:]
    src = others[torch.randint(0, len(others), (num_pairs,), generator=gen)]
    return torch.stack([src, dst], dim=1).to(ids)
