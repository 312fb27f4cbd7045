"""The attention metadata and KV cache of the current batch, set once per step by the runner."""

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V cache


_context: AttentionContext | None = None


def set_context(context: AttentionContext | None) -> None:
    global _context
    _context = context


def get_context() -> AttentionContext:
    if _context is None:
        raise RuntimeError("no attention context is set for this forward pass")
    return _context
