"""Triton kernels (`xllm.ops.cuda`) against the torch reference.

Compiled on a CUDA machine; on the CPU they run under TRITON_INTERPRET=1,
which this module sets when there is no GPU (shapes stay small for speed).
Tolerances: float32 1e-4 (absolute and relative), float16 1e-2, bfloat16 2e-2
(CUDA only); top-k indices, beam choices and KV writes must match exactly.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helpers here
from block_copies import bits, block_pairs  # noqa: E402
from triton_backend import CUDA, DEVICE, DTYPES, TOL  # noqa: E402  (sets TRITON_INTERPRET)

from xllm import ops  # noqa: E402
from xllm.ops import cuda as tri  # noqa: E402
from xllm.ops import reference as ref  # noqa: E402

NEG_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- paged attention


def _attention_case(specs, num_heads, num_kv_heads, head_size, block_size, dtype, seed=0):
    """Random inputs for sequences given as (seq_len, q_len) pairs.

    Blocks are shuffled, each table row has a spare column, and the cache holds
    random values everywhere, so reading past a sequence's end changes the result.
    """
    gen = _gen(seed)
    blocks = [-(-seq_len // block_size) for seq_len, _ in specs]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(0, num_blocks, (len(specs), max(blocks) + 1), generator=gen)
    used = 0
    for b, count in enumerate(blocks):
        table[b, :count] = perm[used : used + count]
        used += count
    q_lens = torch.tensor([q_len for _, q_len in specs])
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    tensors = {
        "q": torch.randn(int(q_lens.sum()), num_heads, head_size, generator=gen),
        "k_cache": torch.randn(cache_shape, generator=gen),
        "v_cache": torch.randn(cache_shape, generator=gen),
    }
    args = {name: t.to(DEVICE, dtype) for name, t in tensors.items()}
    args["query_start_loc"] = torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int().to(DEVICE)
    args["seq_lens"] = torch.tensor([s for s, _ in specs], dtype=torch.int32, device=DEVICE)
    args["block_tables"] = table.int().to(DEVICE)
    args["scale"] = head_size**-0.5
    return args


def _check_attention(args, **launch):
    out = tri.paged_attention_with(**args, **launch) if launch else tri.paged_attention(**args)
    expected = ref.paged_attention(**args)
    assert out.dtype == args["q"].dtype and out.shape == args["q"].shape
    tol = TOL[args["q"].dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_batch(block_size, head_size, group):
    # Context 1, on a block boundary, just past it, and two blocks and a bit.
    specs = [(1, 1), (block_size, 1), (block_size + 1, 1), (2 * block_size + 3, 1)]
    _check_attention(_attention_case(specs, 2 * group, 2, head_size, block_size, torch.float32))


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_chunks(block_size, group):
    specs = [
        (20, 20),  # a whole prompt
        (17 + 16, 16),  # a middle chunk over a cached prefix
        (2 * block_size + 7, 7),  # the chunk that ends a prompt
    ]
    _check_attention(_attention_case(specs, 2 * group, 2, 64, block_size, torch.float32))


@pytest.mark.parametrize("specs", [[(1, 1)], [(9, 9)], [(40, 3)]], ids=["ctx1", "prompt", "chunk"])
def test_batch_of_one(specs):
    _check_attention(_attention_case(specs, 3, 1, 64, 16, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
def test_mixed_prefill_and_decode(dtype, head_size):
    # (10, 0): a sequence with no query rows this step, which must write nothing.
    specs = [(5, 1), (30, 12), (16, 1), (10, 0), (17, 17), (64, 1), (45, 5)]
    _check_attention(_attention_case(specs, 6, 2, head_size, 16, dtype, seed=1))


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("tile_n", [16, 64])
def test_split_kv_long_context(num_splits, tile_n):
    # Uneven splits, and with tile 64 over 300 tokens some splits get no tile at all.
    specs = [(300, 1), (257, 1), (33, 1)]
    args = _attention_case(specs, 3, 1, 64, 16, torch.float32, seed=2)
    _check_attention(args, num_splits=num_splits, tile_n=tile_n)


@pytest.mark.parametrize("group", [3, 16])
def test_many_decodes(group):
    """A decode batch finds each program's sequence from its index (query blocks of 5 and of
    1 query: every kind of program, the idle ones between sequences included)."""
    specs = [(1 + 7 * b % 50, 1) for b in range(37)]
    _check_attention(_attention_case(specs, group, 1, 64, 16, torch.float32, seed=6))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_sequence_search_past_a_wrong_guess(num_splits):
    """No more query tokens than sequences, but one sequence holds them all (one query per
    block with 16 heads per KV head): its programs are found by the search."""
    args = _attention_case([(30, 3), (10, 0), (20, 0)], 16, 1, 64, 16, torch.float32, seed=6)
    _check_attention(args, num_splits=num_splits)


def test_float32_queries_over_a_bfloat16_cache():
    """--kv-cache-dtype bfloat16 under a float32 model: keys and values are widened as read."""
    args = _attention_case([(40, 1), (20, 20), (300, 3)], 6, 2, 64, 16, torch.float32, seed=4)
    args["k_cache"], args["v_cache"] = args["k_cache"].bfloat16(), args["v_cache"].bfloat16()
    _check_attention(args)


def test_split_kv_with_prefill():
    specs = [(150, 40), (97, 1)]
    _check_attention(_attention_case(specs, 6, 2, 128, 8, torch.float32, seed=3), num_splits=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_decode_chooses_splits(dtype):
    # One long sequence leaves most programs idle: the launch heuristic must split it.
    specs = [(1100, 1)]
    args = _attention_case(specs, 3, 1, 64, 32, dtype, seed=4)
    assert tri._choose_splits(args["q"].device, 1) > 1
    _check_attention(args)


def test_splits_ignore_block_table_padding():
    # The engine pads block tables to max_model_len on CUDA: extra columns must change nothing,
    # neither the launch nor a bit of the output.
    args = _attention_case([(300, 1), (40, 1), (129, 1)], 6, 2, 64, 16, torch.float32, seed=5)
    tables = args["block_tables"]
    padded = torch.cat([tables, torch.zeros_like(tables).repeat(1, 7)], dim=1)
    out = tri.paged_attention_with(**args, num_splits=8)
    wide = tri.paged_attention_with(**{**args, "block_tables": padded}, num_splits=8)
    assert torch.equal(out, wide)
    _check_attention(args, num_splits=8)


def test_dispatch_reaches_triton():
    args = _attention_case([(12, 1), (7, 7)], 2, 1, 64, 8, torch.float32)
    with ops.use_backend("triton"):
        out = ops.paged_attention(**args)
    torch.testing.assert_close(out, ref.paged_attention(**args), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 64), (3, 128)])
def test_write_kv(block_size, num_kv_heads, head_size):
    gen = _gen(5)
    num_blocks, tokens = 4, 7
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE)
    key = torch.randn(tokens, num_kv_heads, head_size, generator=gen).to(DEVICE)
    value = torch.randn(tokens, num_kv_heads, head_size, generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[1, 4]] = -1
    slots[-1] = num_blocks * block_size - 1  # the very last slot
    slots = slots.to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tri.write_kv(key, value, k_cache, v_cache, slots)
    ref.write_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_all_skipped_and_empty():
    k_cache = torch.randn(2, 8, 1, 64).to(DEVICE)
    v_cache = torch.randn(2, 8, 1, 64).to(DEVICE)
    before = k_cache.clone(), v_cache.clone()
    key = torch.randn(3, 1, 64).to(DEVICE)
    tri.write_kv(key, key, k_cache, v_cache, torch.full((3,), -1, device=DEVICE))
    tri.write_kv(key[:0], key[:0], k_cache, v_cache, torch.empty(0, dtype=torch.long))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.skipif(not CUDA, reason="half-precision caches are a CUDA case (the interpreter's "
                    "rounding to bfloat16 is not the GPU's)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_casts_to_cache_dtype(dtype):
    k_cache = torch.zeros(2, 16, 2, 64, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(4, 2, 64, device=DEVICE)
    slots = torch.tensor([0, 17, -1, 31], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tri.write_kv(key, -key, k_cache, v_cache, slots)
    ref.write_kv(key, -key, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------- block copies

# A bitwise copy in the cache's own dtype: every float dtype runs, interpreted too.
COPY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_copy(k_cache, v_cache, block_mapping):
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    tri.copy_blocks(k_cache, v_cache, block_mapping)
    ref.copy_blocks(k_ref, v_ref, block_mapping)
    assert torch.equal(bits(k_cache), bits(k_ref)) and torch.equal(bits(v_cache), bits(v_ref))
    untouched = torch.ones(k_cache.shape[1], dtype=torch.bool, device=k_cache.device)
    untouched[block_mapping[:, 1].long()] = False
    assert torch.equal(bits(k_cache[:, untouched]), bits(k_before[:, untouched]))
    assert torch.equal(bits(v_cache[:, untouched]), bits(v_before[:, untouched]))


# (num_layers, num_blocks, block_size, H_kv, D): 16 * 3 * 24 = 1152 elements per block is no
# power of two (one masked chunk), 16 * 2 * 128 = 4096 takes two full chunks, 8 * 5 * 40 = 1600.
@pytest.mark.parametrize("ids", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_pairs", [0, 1, 5])
@pytest.mark.parametrize(
    "shape",
    [(1, 8, 8, 1, 64), (2, 10, 16, 3, 24), (3, 7, 16, 2, 128), (2, 6, 8, 5, 40)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_copy_blocks(shape, num_pairs, ids):
    gen = _gen(40 + num_pairs)
    k_cache = torch.randn(shape, generator=gen)
    k_cache[:, :, 0, 0, :3] = torch.tensor([NEG_INF, float("nan"), -0.0])
    v_cache = torch.randn(shape, generator=gen)
    block_mapping = block_pairs(shape[1], num_pairs, ids, gen).to(DEVICE)
    _check_copy(k_cache.to(DEVICE), v_cache.to(DEVICE), block_mapping)


@pytest.mark.parametrize("dtype", COPY_DTYPES)
def test_copy_blocks_dtypes(dtype):
    gen = _gen(50)
    shape = (3, 9, 16, 3, 24)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    _check_copy(k_cache, v_cache, block_pairs(9, 4, torch.int64, gen).to(DEVICE))


def test_copy_blocks_strided_caches_and_dispatch():
    # Views whose blocks are packed but whose layer and block strides are not the dense ones.
    gen = _gen(51)
    k_cache = torch.randn(3, 12, 8, 2, 24, generator=gen).to(DEVICE)[:, ::2]
    v_cache = torch.randn(3, 8, 8, 2, 24, generator=gen).to(DEVICE)[:, 2:]
    assert not k_cache.is_contiguous() and not v_cache.is_contiguous()
    _check_copy(k_cache, v_cache, torch.tensor([[0, 5], [0, 1], [3, 2]], device=DEVICE))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    block_mapping = torch.tensor([[4, 0]], dtype=torch.int32, device=DEVICE)
    with ops.use_backend("triton"):
        ops.copy_blocks(k_cache, v_cache, block_mapping)
    ref.copy_blocks(k_ref, v_ref, block_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(ValueError, match="contiguous"):
        tri.copy_blocks(k_cache.transpose(3, 4), v_cache.transpose(3, 4), block_mapping)


# ---------------------------------------------------------------- top-k logprobs


def _check_topk(logits, k, token_ids, **launch):
    values, indices, chosen = (
        tri.topk_logprobs_with(logits, k, token_ids, **launch)
        if launch
        else tri.topk_logprobs(logits, k, token_ids)
    )
    exp_values, exp_indices, exp_chosen = ref.topk_logprobs(logits, k, token_ids)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert chosen.dtype == torch.float32
    assert torch.equal(indices, exp_indices)
    torch.testing.assert_close(values, exp_values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chosen, exp_chosen, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("vocab", [50, 4096, 10_000])
def test_topk_random(k, vocab):
    logits = (3 * torch.randn(3, vocab, generator=_gen(vocab + k))).to(DEVICE)
    tokens = torch.tensor([0, vocab - 1, vocab // 2], device=DEVICE)
    _check_topk(logits, k, tokens)


@pytest.mark.parametrize("k", [1, 20])
def test_topk_ties_lower_id_first(k):
    # Few distinct values over many ids: every top-k boundary falls inside a tie.
    logits = torch.randint(0, 4, (4, 9000), generator=_gen(6)).float()
    logits[1] = 0.0  # one row where everything ties
    tokens = torch.tensor([3, 8999, 4500, 0])
    _check_topk(logits.to(DEVICE), k, tokens.to(DEVICE))


@pytest.mark.parametrize("k", [1, 20])
def test_topk_neg_inf_and_dominating(k):
    logits = torch.randn(4, 5000, generator=_gen(7))
    logits[0, 4321] = 1e4  # one entry dominates: its logprob is 0, the rest are tiny
    logits[1, 10:] = NEG_INF  # only 10 finite entries, fewer than k
    logits[2, ::2] = NEG_INF
    logits[3] = -1e30  # huge negative logits underflow exp(); three top entries tie
    logits[3, [0, 7, 4999]] = 0.0
    tokens = torch.tensor([4321, 11, 2, 1])  # row 1 and 2 pick a -inf token
    _check_topk(logits.to(DEVICE), k, tokens.to(DEVICE))


@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_small_chunks(k):
    # Many small chunks feeding the merge, ties, and a -inf chosen token.
    logits = torch.randint(-3, 3, (2, 300), generator=_gen(8)).float()
    logits[1, 7] = NEG_INF
    tokens = torch.tensor([5, 7])
    _check_topk(logits.to(DEVICE), k, tokens.to(DEVICE), vocab_chunk=64)


def test_topk_full_vocab():
    logits = (4 * torch.randn(1, 152_064, generator=_gen(9))).to(DEVICE)
    _check_topk(logits, 20, torch.tensor([151_000], device=DEVICE))


@pytest.mark.skipif(not CUDA, reason="half-precision logits are a CUDA case")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_logits(dtype):
    logits = (3 * torch.randn(8, 49_152, generator=_gen(10))).to(DEVICE, dtype)
    tokens = torch.randint(0, 49_152, (8,), generator=_gen(11)).to(DEVICE)
    _check_topk(logits, 20, tokens)


# ---------------------------------------------------------------- beam pruning


def _check_beam(beam_scores, tokens, logprobs, num_keep):
    got = tri.beam_prune(beam_scores, tokens, logprobs, num_keep)
    expected = ref.beam_prune(beam_scores, tokens, logprobs, num_keep)
    for name, g, e in zip(("parent", "token", "score"), got, expected, strict=True):
        assert g.dtype == e.dtype, name
        assert torch.equal(g, e), name


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 8])
def test_beam_prune_random(width):
    gen = _gen(width)
    groups, cands = 5, 2 * width
    scores = torch.randn(groups, width, generator=gen)
    tokens = torch.randint(0, 50_000, (groups, width, cands), generator=gen)
    logprobs = -torch.rand(groups, width, cands, generator=gen) * 5
    logprobs = logprobs.sort(dim=-1, descending=True).values
    _check_beam(*(t.to(DEVICE) for t in (scores, tokens, logprobs)), 2 * width)


@pytest.mark.parametrize("width", [1, 3, 8])
def test_beam_prune_ties_and_dead_beams(width):
    gen = _gen(20 + width)
    groups, cands = 4, 2 * width
    # Integer scores and few token ids: many equal sums, repeated tokens in one beam.
    scores = torch.randint(-3, 0, (groups, width), generator=gen).float()
    scores[1, -1] = NEG_INF  # a padded, dead beam
    scores[2] = NEG_INF  # a group with only dead beams
    tokens = torch.randint(0, 4, (groups, width, cands), generator=gen)
    logprobs = torch.randint(-3, 1, (groups, width, cands), generator=gen).float()
    logprobs[0, 0, 0] = NEG_INF
    for keep in sorted({1, 2 * width, width * cands}):
        _check_beam(*(t.to(DEVICE) for t in (scores, tokens, logprobs)), keep)


def test_beam_prune_many_candidates():
    # More candidates than one tile of the pairwise ranking.
    gen = _gen(30)
    scores = torch.randn(3, 8, generator=gen)
    tokens = torch.randint(0, 100, (3, 8, 200), generator=gen)
    logprobs = torch.randint(-20, 0, (3, 8, 200), generator=gen).float() / 4
    _check_beam(*(t.to(DEVICE) for t in (scores, tokens, logprobs)), 16)


# ---------------------------------------------------------------- compiled for sm_90, without a GPU

AOT_SCRIPT = r"""
import sys
import torch
import xllm.ops.cuda as tri
import triton_aot as aot

assert not tri.INTERPRETED
names = ("paged_attention_kernel", "reduce_splits_kernel", "write_kv_kernel",
         "chunk_stats_kernel", "chunk_topk_kernel", "merge_topk_kernel", "beam_prune_kernel",
         "copy_blocks_kernel")
recorders = aot.record(tri, names)

def attention(dtype, num_seqs, q_len, heads, kv_heads, head_size, block_size, **launch):
    q = torch.zeros(num_seqs * q_len, heads, head_size, dtype=dtype)
    cache = torch.zeros(64, block_size, kv_heads, head_size, dtype=dtype)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32) * q_len
    seq_lens = torch.full((num_seqs,), 4096, dtype=torch.int32)
    tables = torch.zeros(num_seqs, 4096 // block_size, dtype=torch.int32)
    tri.paged_attention_with(q, cache, cache, qsl, seq_lens, tables, 0.1, **launch)

attention(torch.float16, 64, 1, 28, 4, 128, 16, num_splits=4)  # Qwen2-7B decode, split
attention(torch.bfloat16, 2, 512, 9, 3, 64, 16)  # SmolLM2 prefill
attention(torch.float32, 2, 256, 8, 8, 128, 128, tile_n=32)  # the CUDA float32 tile
attention(torch.float32, 8, 1, 24, 8, 64, 8, tile_n=32)
cache = torch.zeros(8, 16, 4, 128, dtype=torch.float16)
tri.write_kv(torch.zeros(5, 4, 128), torch.zeros(5, 4, 128), cache, cache, torch.arange(5))
stacked = torch.zeros(28, 8, 16, 4, 128, dtype=torch.float16)  # Qwen2-7B: two full chunks
tri.copy_blocks(stacked, stacked, torch.tensor([[0, 1], [0, 2]]))
stacked = torch.zeros(30, 8, 16, 3, 64, dtype=torch.bfloat16)  # SmolLM2: a masked tail
tri.copy_blocks(stacked, stacked, torch.tensor([[0, 1]], dtype=torch.int32))
logits = torch.zeros(4, 152064, dtype=torch.bfloat16)
tri.topk_logprobs(logits, 20, torch.zeros(4, dtype=torch.long))
tri.beam_prune(torch.zeros(64, 8), torch.zeros(64, 8, 16, dtype=torch.long),
               torch.zeros(64, 8, 16), 16)

sys.exit(1 if aot.compile_recorded(recorders, hidden=("PRECISION",)) else 0)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the tests above compile the kernels for real")
def test_kernels_compile_for_hopper():
    # The interpreter checks neither types nor shape limits of compiled Triton: compile every
    # kernel, as the wrappers launch it, for sm_90 (about 50 s cold, 10 s from Triton's cache).
    pytest.importorskip("triton.backends.nvidia")
    import triton_aot

    run = triton_aot.run_script(AOT_SCRIPT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok ") == 12
