"""Scheduler on its own: token budget, admission, preemption order, logits rows, n > 1 rule."""

from xllm.engine.block_manager import BlockManager
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import Scheduler, StepPlan
from xllm.engine.sequence import Sequence, Status
from xllm.inputs import PromptInput

BS = 4
NEXT_TOKEN = 7


def seq(name: str, prompt_len: int, index: int = 0, **params) -> Sequence:
    return Sequence(name, index, PromptInput.of(list(range(1, prompt_len + 1))),
                    SamplingParams(**params))


def step(scheduler: Scheduler) -> StepPlan:
    """Schedule, then do what the engine does after the forward pass (no model)."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        item.seq.num_computed += item.num_new_tokens
        scheduler.blocks.commit(item.seq)
    for item in plan.sampled:
        item.seq.token_ids.append(NEXT_TOKEN)
    return plan


def chunks(plan: StepPlan) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_new_tokens) for item in plan.scheduled]


def test_budget_chunks_prompts_and_decodes_go_first():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq("a", 3), seq("b", 25)
    s.add(a)
    s.add(b)
    assert chunks(step(s)) == [("a", 3), ("b", 7)]
    assert chunks(step(s)) == [("a", 1), ("b", 9)]  # a decodes first, b's next chunk after
    plan = step(s)
    assert chunks(plan) == [("a", 1), ("b", 9)]
    assert [item.sample_row for item in plan.scheduled] == [0, 1]  # b's prompt is done
    assert sum(n for _, n in chunks(step(s))) == 2


def test_partial_chunks_have_no_rows_and_sampled_rows_follow_plan_order():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=8)
    long_prompt, short = seq("long", 12), seq("short", 2)
    s.add(short)
    s.add(long_prompt)
    plan = step(s)
    assert chunks(plan) == [("short", 2), ("long", 6)]
    assert plan.num_rows == 1 and plan.scheduled[0].sample_row == 0
    assert plan.scheduled[1].sample_row is None and plan.scheduled[1].logit_offsets == []
    assert plan.scheduled[0].input().logit_offsets == [1]


def test_prompt_logprob_rows_come_before_the_sample_row():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=4)
    a = seq("a", 6, prompt_logprobs=1)
    a.prompt_logprobs = [None]  # as the engine sets it: position 0 has no logprob
    s.add(a)
    plan = s.schedule()  # positions 0-3 give the logprobs of tokens 1-4
    item = plan.scheduled[0]
    assert (item.prompt_rows, item.sample_row, item.logit_offsets) == (range(0, 4), None,
                                                                       [0, 1, 2, 3])
    a.num_computed += 4
    a.prompt_logprobs += [None] * 4
    plan = s.schedule()  # position 4 gives token 5's; position 5 samples
    item = plan.scheduled[0]
    assert (item.prompt_rows, item.sample_row, item.logit_offsets) == (range(0, 1), 1, [0, 1])
    assert plan.num_rows == 2


def test_admission_respects_the_sequence_cap_in_arrival_order():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        s.add(seq(name, 3))
    assert [r for r, _ in chunks(step(s))] == ["a", "b"]
    assert [x.request_id for x in s.waiting] == ["c"]
    s.finish(s.running[0])
    assert [r for r, _ in chunks(step(s))] == ["b", "c"]


def test_admission_keeps_a_free_block_per_running_sequence():
    s = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=100)
    s.add(seq("a", 4))  # one block
    step(s)
    s.add(seq("b", 8))  # two blocks + a's reserve = 3 of the 3 free: admitted
    s.add(seq("c", 1))  # one more block + two reserves > 1 free: waits
    plan = step(s)
    assert [r for r, _ in chunks(plan)] == ["a", "b"]
    assert [x.request_id for x in s.waiting] == ["c"]


def test_the_newest_sequence_is_preempted_when_blocks_run_out():
    s = Scheduler(BlockManager(3, BS), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 4), seq("b", 3)
    s.add(a)
    s.add(b)
    step(s)  # a: 1 block (full), b: 1 block; a's decode needs a second block
    assert a.num_tokens == 5 and b.num_tokens == 4
    step(s)  # a takes the last free block; b still fits in its own
    assert s.blocks.num_free_blocks == 0
    for _ in range(3):
        step(s)  # b needs a new block: none free, b (the newest) is preempted
    assert s.num_preemptions >= 1 and b.status is Status.WAITING
    assert b.block_table == [] and b.num_computed == 0 and s.waiting[0] is b
    assert a.status is Status.RUNNING


def test_other_choices_wait_until_the_first_has_its_prompt():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=6)
    first, second = seq("r", 9, index=0), seq("r", 9, index=1)
    second.wait_for = first
    s.add(first)
    s.add(second)
    assert s.num_waiting == 2
    assert chunks(step(s)) == [("r", 6)]
    assert chunks(step(s)) == [("r", 3)]  # first's prompt is now computed
    plan = step(s)
    assert [item.seq for item in plan.scheduled] == [first, second]
    # the second choice found the first's two full prompt blocks in the prefix cache
    assert plan.scheduled[1].start == 8 and plan.scheduled[1].num_new_tokens == 1
    assert second.wait_for is None


def test_finish_frees_blocks_wherever_the_sequence_is():
    bm = BlockManager(16, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    running, waiting, held = seq("a", 5), seq("b", 5), seq("c", 5)
    held.wait_for = seq("x", 5)
    s.add(running)
    step(s)
    s.add(waiting)
    s.add(held)
    for x in (running, waiting, held):
        s.finish(x)
        assert x.status is Status.FINISHED and x.block_table == []
    assert not s.running and not s.waiting and not s.held
    assert bm.num_free_blocks == 16


def test_admission_is_fair_between_requests():
    """A request of many choices does not hold back one that came after it: each free slot
    goes to the request with the fewest sequences running."""
    s = Scheduler(BlockManager(64, BS), max_num_seqs=3, max_num_batched_tokens=64)
    many = [seq("many", 2, index=i) for i in range(6)]
    for choice in many:
        s.add(choice)
    s.add(seq("one", 2))
    assert chunks(step(s)) == [("many", 2), ("one", 2), ("many", 2)]
    for done in [item.seq for item in s.schedule().scheduled][:2]:  # two slots free up
        s.finish(done)
    s.add(seq("late", 2))
    admitted = [name for name, _ in chunks(s.schedule())][1:]
    assert admitted == ["late", "many"]  # "late" runs nothing yet: it goes first


def test_max_tokens_zero_samples_nothing():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=64)
    scored = seq("score", 5, max_tokens=0, prompt_logprobs=1)
    scored.prompt_logprobs = [None]  # as the engine starts it
    s.add(scored)
    plan = step(s)
    assert plan.sampled == [] and plan.num_rows == 4  # prompt rows only
