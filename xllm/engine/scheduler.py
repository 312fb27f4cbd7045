"""Continuous batching: which sequences run this step, how many tokens each, which logits rows.

Every step gives each running sequence its next chunk (one token for a
decode, up to the token budget for a prompt), then admits waiting sequences
while the budget, the sequence cap and the free blocks allow. When a running
sequence needs a block and none is free, the most recently admitted sequence
is preempted: its blocks are freed and it waits to be recomputed. A sequence
with `wait_for` set is held back until that sequence's prompt is computed, so
that it finds the prompt in the prefix cache (the other choices of n > 1).

The beams of a beam-search group are one unit: admitted together, preempted
together, and kept next to each other in the running list.

The result is a `StepPlan`: per sequence, its tokens of this step and which
rows of the step's logits are its own, and the blocks to copy before the step
(copy on write of a beam's shared last block).
"""

from collections import Counter, deque
from dataclasses import dataclass, field

from xllm.engine.block_manager import BlockManager
from xllm.engine.sequence import Sequence, Status
from xllm.model.runner import SeqInput


@dataclass
class ScheduledSeq:
    """One sequence's share of a step and its rows of the step's logits.

    `logit_offsets` are the offsets into this step's tokens whose next-token
    logits are wanted, in row order: first the prompt positions whose logprobs
    are asked for (`prompt_rows`: prompt logprobs, or the sample points of
    /v1/sample), then the last token when the sequence samples its next token
    from row `sample_row`.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    logit_offsets: list[int]
    prompt_rows: range
    sample_row: int | None
    revisit: bool = False  # a cached token run again for its logits only (a sample point)

    def input(self) -> SeqInput:
        seq, end = self.seq, self.start + self.num_new_tokens
        return SeqInput(seq.prompt, seq.token_ids[self.start : end], self.start, seq.block_table,
                        self.logit_offsets, write_kv=not self.revisit)


@dataclass
class StepPlan:
    """What one step runs; the logits come back with `num_rows` rows, in plan order."""

    scheduled: list[ScheduledSeq]
    num_rows: int
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, first

    def inputs(self, block_size: int) -> tuple[list[SeqInput], list[int] | None]:
        """The runner's inputs, where a cached sample point that another sequence of this
        step runs again on the same cached blocks runs once; and each plan row's row of
        the runner's logits (None: the same rows)."""
        inputs, rows, seen, computed = [], [], {}, 0
        for item in self.scheduled:
            if item.revisit:
                key = (tuple(item.seq.block_table[: item.start // block_size + 1]), item.start)
                if key in seen:
                    rows.append(seen[key])
                    continue
                seen[key] = computed
            rows.extend(range(computed, computed + len(item.logit_offsets)))
            computed += len(item.logit_offsets)
            inputs.append(item.input())
        return inputs, None if len(inputs) == len(self.scheduled) else rows

    @property
    def sampled(self) -> list[ScheduledSeq]:
        """The sequences that sample their next token from their `sample_row`."""
        return [item for item in self.scheduled
                if item.sample_row is not None and item.seq.beams is None]

    @property
    def searched(self) -> list[ScheduledSeq]:
        """The beams that offer candidates from their `sample_row` to their group's search."""
        return [item for item in self.scheduled
                if item.sample_row is not None and item.seq.beams is not None]

    def shares(self) -> dict[str, list[int]]:
        """Each request's items, by their index in `scheduled`."""
        shares: dict[str, list[int]] = {}
        for i, item in enumerate(self.scheduled):
            shares.setdefault(item.seq.request_id, []).append(i)
        return shares


def plan_rows(chunks: list[tuple[Sequence, int]]) -> StepPlan:
    """Number the logits rows of (sequence, new tokens) chunks, in order."""
    scheduled, row = [], 0
    for seq, n in chunks:
        for point in seq.cached_points():  # found in the prefix cache: their logits only
            scheduled.append(ScheduledSeq(seq, point, 1, [0], range(row, row + 1), None, True))
            row += 1
        if not n:  # only cached sample points to run again
            continue
        start, end = seq.num_computed, seq.num_computed + n
        offsets = [p - start for p in seq.logit_positions(start, end)]
        prompt_rows = range(row, row + len(offsets))
        sample_row = None
        if end == seq.num_tokens and seq.params.max_tokens != 0:
            sample_row = prompt_rows.stop
            offsets.append(n - 1)
        row += len(offsets)
        scheduled.append(ScheduledSeq(seq, start, n, offsets, prompt_rows, sample_row))
    return StepPlan(scheduled, row)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.held: list[Sequence] = []  # waiting on `wait_for`
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.held)

    def add(self, seq: Sequence) -> None:
        (self.held if seq.wait_for is not None else self.waiting).append(seq)

    def _release_held(self) -> None:
        """Move sequences whose `wait_for` has its prompt computed (or is gone) to waiting."""
        still = []
        for seq in self.held:
            leader = seq.wait_for
            if leader.prompt_computed or leader.finished:
                seq.wait_for = None
                self.waiting.append(seq)
            else:
                still.append(seq)
        self.held = still

    def schedule(self) -> StepPlan:
        if self.held:
            self._release_held()
        budget = self.max_num_batched_tokens
        chunks: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_to_compute - seq.num_computed, budget)
            while not self.blocks.allocate(seq, seq.num_computed + n):
                self._preempt(self.running[-1])
                preempted = True
                if seq.status is Status.WAITING:
                    break
            if seq.status is Status.WAITING:
                break
            chunks.append((seq, n))
            budget -= n
            i += 1
        if preempted:  # a preempted beam group may have had beams scheduled already
            chunks = [(seq, n) for seq, n in chunks if seq.status is Status.RUNNING]
        # Admit waiting sequences, keeping a free block per running sequence for its decodes.
        running_per_request = Counter(seq.request_id for seq in self.running)
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            admitted = self._admit(self._next_waiting(running_per_request), budget)
            if admitted is None:
                break
            for seq, n in admitted:
                running_per_request[seq.request_id] += 1
                if n or seq.cached_points():
                    chunks.append((seq, n))
                    budget -= n
        plan = plan_rows(chunks)
        plan.copies = self.blocks.take_copies()
        return plan

    def _admit(self, first: Sequence, budget: int) -> list[tuple[Sequence, int]] | None:
        """Admit `first` (with the other waiting beams of its group: all or none) within
        `budget` tokens; None, changing nothing, when the free blocks do not suffice."""
        unit = [first] if first.beams is None else \
            [seq for seq in first.beams if seq.status is Status.WAITING]
        chunks, needed = [], 0
        for seq in unit:
            if not seq.block_table and not seq.needs_prompt_logprobs:
                seq.num_computed = self.blocks.allocate_prefix(seq)
            n = min(seq.num_to_compute - seq.num_computed, budget)
            needed += self.blocks.blocks_needed(seq, seq.num_computed + n)
            chunks.append((seq, n))
            budget -= n
        if needed + len(self.running) + len(unit) - 1 > self.blocks.num_free_blocks:
            for seq in unit:
                self.blocks.free(seq)
                seq.num_computed = 0
            return None
        for seq, n in chunks:
            self.blocks.allocate(seq, seq.num_computed + n)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
        return chunks

    def _next_waiting(self, running_per_request: Counter) -> Sequence:
        """The waiting sequence to admit next: the first one of the requests with the
        fewest sequences running, so that no request starves the others."""
        best, fewest = self.waiting[0], running_per_request[self.waiting[0].request_id]
        for seq in self.waiting:
            if fewest == 0:
                break
            count = running_per_request[seq.request_id]
            if count < fewest:
                best, fewest = seq, count
        return best

    def _preempt(self, victim: Sequence) -> None:
        """Free a running sequence's blocks (a beam's: its whole group's) and put it first
        in line to be recomputed."""
        unit = [victim] if victim.beams is None else \
            [seq for seq in victim.beams if seq.status is Status.RUNNING]
        for seq in reversed(unit):
            self.running.remove(seq)
            self.blocks.free(seq)
            seq.num_computed = 0
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
            self.num_preemptions += 1

    def replace_beams(self, old: list[Sequence], new: list[Sequence]) -> None:
        """A beam group's step: the running beams `old` become `new` (kept together in the
        running list, where the group was). Beams of `old` not in `new` are finished."""
        at = min(self.running.index(seq) for seq in old)
        for seq in old:
            if seq not in new:
                self.finish(seq)
            else:
                self.running.remove(seq)
        for seq in new:
            seq.status = Status.RUNNING
        self.running[at:at] = new

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        self.blocks.free(seq)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.held:
            self.held.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
