"""Continuous batching: which sequences run this step, and how many tokens each.

Every step gives each running sequence its next chunk (one token for a
decode, up to the token budget for a prompt), then admits waiting sequences
while the budget, the sequence cap and the free blocks allow. When a running
sequence needs a block and none is free, the most recently admitted sequence
is preempted: its blocks are freed and it waits to be recomputed.
"""

from collections import deque
from dataclasses import dataclass

from xllm.engine.block_manager import BlockManager
from xllm.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq, seq.num_computed + n):
                self._preempt(self.running.pop())
                preempted = True
                if seq.status is Status.WAITING:
                    break
            if seq.status is Status.WAITING:
                break
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        # Admit waiting sequences, keeping a free block per running sequence for its decodes.
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if not seq.block_table and not seq.needs_prompt_logprobs:
                seq.num_computed = self.blocks.allocate_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            needed = self.blocks.blocks_needed(seq, seq.num_computed + n)
            if needed + len(self.running) > self.blocks.num_free_blocks:
                self.blocks.free(seq)
                seq.num_computed = 0
                break
            self.blocks.allocate(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        self.blocks.free(seq)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
