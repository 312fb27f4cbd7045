"""CUDA graphs of decode steps: the model's forward pass captured once per batch size of a
ladder, and replayed on static input buffers.

A decode step has one token per sequence. Its inputs are copied into the static buffers
of the smallest captured size that holds the batch; the rows past the batch are padding
(token 0 at position 0, no KV write, a context of one token in block 0) whose outputs
are dropped. Block tables have one fixed width, so neither a graph nor the attention
kernel's split choice depends on the batch's longest sequence.
"""

import logging
import time

import torch

from xllm.model.context import AttentionContext, set_context

logger = logging.getLogger(__name__)


def batch_ladder(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_seqs` (and `max_seqs` itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_seqs] + list(range(16, max_seqs, 16))
    return sorted(set(sizes + [max_seqs]))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_seqs: int,
                 table_width: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = batch_ladder(max_seqs)
        self.table_width = table_width
        most = self.sizes[-1]
        self.ids = torch.zeros(most, dtype=torch.long, device=device)
        self.positions = torch.zeros(most, dtype=torch.long, device=device)
        self.slots = torch.full((most,), -1, dtype=torch.long, device=device)
        self.query_start = torch.arange(most + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(most, dtype=torch.int32, device=device)
        self.tables = torch.zeros(most, table_width, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _context(self, size: int) -> AttentionContext:
        return AttentionContext(
            slot_mapping=self.slots[:size], query_start_loc=self.query_start[: size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
            kv_caches=self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size of the ladder, largest first (the smaller ones reuse its
        memory pool)."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            set_context(self._context(size))
            try:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm up: Triton compiles here, not inside
                    for _ in range(2):
                        self.model(self.ids[:size], self.positions[:size])
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.model(self.ids[:size], self.positions[:size])
                self.pool = graph.pool()
                self.graphs[size] = (graph, out)
            finally:
                set_context(None)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s",
                    self.sizes, time.perf_counter() - start)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_lens: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode batch of n <= max_batch sequences, whose
        block tables are [n, width] with width <= the captured one."""
        n = ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.slots[n:size].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.tables[n:size].zero_()
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
