"""BlockManager on its own: allocation, ref counts, prefix-cache hits and misses, forks."""

import pytest

from xllm.engine.block_manager import BlockKey, BlockManager
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.sequence import Sequence
from xllm.inputs import PromptInput

BS = 4


def seq(tokens: list[int], index: int = 0) -> Sequence:
    return Sequence("r", index, PromptInput.of(tokens), SamplingParams())


def computed(manager: BlockManager, s: Sequence) -> Sequence:
    """Allocate `s` whole, as if its tokens were computed, and commit it to the cache."""
    s.num_computed = manager.allocate_prefix(s)
    assert manager.allocate(s, s.num_tokens)
    s.num_computed = s.num_tokens
    manager.commit(s)
    return s


def test_allocate_grows_the_table_and_refuses_without_change():
    m = BlockManager(4, BS)
    s = seq(list(range(6)))
    assert m.blocks_needed(s, 6) == 2
    assert m.allocate(s, 6) and len(s.block_table) == 2 and m.num_free_blocks == 2
    assert m.allocate(s, 8) and len(s.block_table) == 2  # still fits
    assert not m.allocate(s, 17)  # needs 3 more, 2 free
    assert len(s.block_table) == 2 and m.num_free_blocks == 2
    m.free(s)
    assert s.block_table == [] and m.num_free_blocks == 4 and not any(m.ref_counts)


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    m = BlockManager(16, BS)
    a = computed(m, seq(list(range(10))))  # blocks [0-3] [4-7] and a partial one
    b = seq(list(range(10)) + [99])
    assert m.allocate_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [m.ref_counts[x] for x in b.block_table] == [2, 2]
    assert (m.queries, m.hits) == (4, 2)  # a's lookup missed twice, b's hit twice
    # A prompt of exactly two blocks: the last token must be computed, so one block hits.
    c = seq(list(range(8)))
    assert m.allocate_prefix(c) == 4 and m.hits == 3


def test_a_different_block_ends_the_prefix_and_later_blocks_never_hit():
    m = BlockManager(16, BS)
    computed(m, seq(list(range(12)) + [0]))
    s = seq([0, 1, 2, 3, 0, 0, 0, 0, 8, 9, 10, 11, 0])  # block 1 differs, block 2 is equal
    assert m.allocate_prefix(s) == 4  # block 2 has another prefix: no hit


def test_a_hit_compares_the_tokens_not_only_a_hash(monkeypatch):
    monkeypatch.setattr(BlockKey, "__hash__", lambda self: 0)  # every key collides
    m = BlockManager(16, BS)
    computed(m, seq([1, 2, 3, 4, 5]))
    assert m.allocate_prefix(seq([1, 2, 3, 9, 5])) == 0
    assert m.allocate_prefix(seq([1, 2, 3, 4, 5])) == 4


def test_chain_state_lives_on_the_sequence():
    m = BlockManager(16, BS)
    s = seq(list(range(9)))
    m.allocate(s, 9)
    s.num_computed = 5
    m.commit(s)
    assert s.num_hashed_blocks == 1 and len(s.prefix_digest) == 16
    first = s.prefix_digest
    s.num_computed = 9
    m.commit(s)
    assert s.num_hashed_blocks == 2 and s.prefix_digest != first
    m.free(s)
    assert (s.num_hashed_blocks, s.prefix_digest) == (0, b"")


def test_a_free_cached_block_is_reused_last_and_then_forgotten():
    m = BlockManager(3, BS)
    a = computed(m, seq(list(range(5))))  # block 0 cached, block 1 partial
    cached = a.block_table[0]
    m.free(a)
    assert m.num_free_blocks == 3
    b = seq([7] * 12)
    assert m.allocate(b, 8)  # takes the never-used block and a's partial block first
    assert cached not in b.block_table
    again = seq(list(range(5)))
    assert m.allocate_prefix(again) == 4  # still cached
    m.free(again)
    m.free(b)
    c = seq([8] * 12)
    assert m.allocate(c, 12)  # all three blocks: the cached one is overwritten
    assert m.allocate_prefix(seq(list(range(5)))) == 0


def test_shared_blocks_are_freed_by_their_last_holder():
    m = BlockManager(8, BS)
    a = computed(m, seq(list(range(9))))
    b = seq(list(range(9)))
    b.num_computed = m.allocate_prefix(b)
    m.allocate(b, 9)
    shared = set(a.block_table) & set(b.block_table)
    assert len(shared) == 2
    m.free(a)
    assert all(m.ref_counts[x] == 1 for x in shared)
    assert not shared & set(m.free_queue)
    m.free(b)
    assert m.num_free_blocks == 8 and not any(m.ref_counts)


def test_fork_shares_every_block_by_reference():
    m = BlockManager(8, BS)
    parent = computed(m, seq(list(range(6))))
    child = seq(list(range(6)), index=1)
    m.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(m.ref_counts[x] == 2 for x in parent.block_table)
    assert (child.num_hashed_blocks, child.prefix_digest) == \
        (parent.num_hashed_blocks, parent.prefix_digest)
    with pytest.raises(ValueError):
        m.fork(parent, child)  # the child already holds blocks
    m.free(parent)
    assert all(m.ref_counts[x] == 1 for x in child.block_table)
    assert m.num_free_blocks == 8 - len(child.block_table)
    m.free(child)
    assert m.num_free_blocks == 8


def test_reset_needs_no_holders_and_disabled_cache_never_hits():
    m = BlockManager(8, BS)
    a = computed(m, seq(list(range(9))))
    with pytest.raises(RuntimeError):
        m.reset_prefix_cache()
    m.free(a)
    m.reset_prefix_cache()
    assert m.allocate_prefix(seq(list(range(9)))) == 0
    off = BlockManager(8, BS, enable_prefix_caching=False)
    computed(off, seq(list(range(9))))
    assert off.allocate_prefix(seq(list(range(9)))) == 0 and off.queries == 0
