"""The C++ (CPU) kernels against the torch reference over shapes and edge cases.

Every test runs once per instruction-set variant this CPU supports (the `cpu_isa` fixture):
on an AVX-512 host the AVX-512, AVX2 and baseline builds of the SIMD kernels all run.
"""

import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from xllm import ops
from xllm.ops import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # block_copies
from block_copies import bits, block_pairs  # noqa: E402

try:
    from xllm.ops import cpu
    from xllm.ops.cpu import _C
except ImportError:  # the suite must not pass without them: cpu_isa fails every test
    cpu = _C = None

pytestmark = pytest.mark.usefixtures("cpu_isa")

# float32 tolerances: attention sums products of O(1) values over up to a few
# thousand keys in another order (and with FMA); logprobs differ by the order of
# the softmax sum; beam scores are the same single float32 addition (exact).
ATTN_TOL = {"atol": 2e-5, "rtol": 1e-4}
LOGPROB_TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    seed: int = 0,
    spare_blocks: int = 3,
):
    """A paged cache holding the sequences [(seq_len, q_len), ...] in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, math.ceil(s / block_size)) for s, _ in seqs]
    max_blocks = max(blocks_per_seq) + 1  # one unused column, filled with junk ids
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seqs), max_blocks), 10**6, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used : used + n].int()
        used += n
    q_lens = [q for _, q in seqs]
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    q = torch.randn((sum(q_lens), num_heads, head_size), generator=gen)
    return q, k_cache, v_cache, query_start_loc, seq_lens, block_tables


def check_attention(seqs, num_heads, num_kv_heads, head_size, block_size, seed=0,
                    kv_dtype=torch.float32):
    """The kernel against the reference on the same caches (float32 or bfloat16: the reference
    widens bfloat16 keys and values to float32 too, so the tolerance is float32's)."""
    q, k_cache, v_cache, qsl, seq_lens, block_tables = make_batch(
        seqs, num_heads, num_kv_heads, head_size, block_size, seed
    )
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    scale = head_size**-0.5
    want = reference.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale)
    got = cpu.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale)
    assert got.shape == want.shape and got.dtype == torch.float32
    rows = slice(0, int(qsl[-1]))
    torch.testing.assert_close(got[rows], want[rows], **ATTN_TOL)


# (seq_len, q_len) per sequence.
ATTENTION_CASES = {
    "context_1": [(1, 1)],
    "prefill_one_token": [(1, 1), (1, 1)],
    "on_block_boundary": [(16, 1), (32, 1), (16, 16)],
    "past_block_boundary": [(17, 1), (33, 1), (17, 17)],
    "chunk_ends_prompt": [(45, 13)],
    "chunk_mid_prompt_then_decode": [(40, 8), (41, 1)],
    "mixed_prefill_decode": [(70, 70), (5, 1), (129, 1), (60, 20), (1, 1)],
    "empty_sequence_in_batch": [(20, 0), (21, 1), (9, 9)],
    "many_decodes": [(1 + 37 * i % 300, 1) for i in range(40)],
    # Long keys of few items are split across threads (when there are several).
    "long_decode_split": [(5000, 1)],
    "two_long_decodes": [(4000, 1), (2900, 1)],
    "multi_tile_prefill": [(150, 150)],
    "prefill_after_long_prefix": [(700, 90)],
    "short_chunks": [(12, 2), (30, 3), (9, 4), (5, 1)],
}


KV_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_paged_attention_cases(case, kv_dtype):
    check_attention(ATTENTION_CASES[case], num_heads=9, num_kv_heads=3, head_size=64, block_size=16,
                    kv_dtype=kv_dtype)


@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
@pytest.mark.parametrize("head_size", [64, 128])
def test_paged_attention_block_and_head_sizes(block_size, head_size):
    seqs = [(block_size, 1), (block_size + 1, 1), (3 * block_size - 1, 2 * block_size), (1, 1)]
    check_attention(seqs, num_heads=4, num_kv_heads=2, head_size=head_size, block_size=block_size)


@pytest.mark.parametrize("group", [1, 3, 7, 16])
def test_paged_attention_gqa_groups(group):
    seqs = [(50, 50), (77, 1), (33, 5)]
    check_attention(seqs, num_heads=2 * group, num_kv_heads=2, head_size=64, block_size=16)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("head_size", [32, 40, 96])
def test_paged_attention_other_head_sizes(head_size, kv_dtype):
    seqs = [(30, 30), (19, 1), (70, 1)]
    check_attention(seqs, num_heads=6, num_kv_heads=2, head_size=head_size, block_size=8,
                    kv_dtype=kv_dtype)


def test_paged_attention_reads_the_bfloat16_cache_as_is():
    """A bfloat16 cache gives the float32 result of its own (rounded) values, which differs
    from the float32 cache's: the kernel reads the 16-bit values, not a stale float copy."""
    seqs = [(300, 1), (40, 40)]
    q, k_cache, v_cache, qsl, seq_lens, block_tables = make_batch(seqs, 9, 3, 64, 16, seed=5)
    k_half, v_half = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    got = cpu.paged_attention(q, k_half, v_half, qsl, seq_lens, block_tables, 0.125)
    widened = cpu.paged_attention(q, k_half.float(), v_half.float(), qsl, seq_lens, block_tables,
                                  0.125)
    full = cpu.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, 0.125)
    torch.testing.assert_close(got, widened, **ATTN_TOL)
    assert (got - full).abs().max() > 1e-3


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_paged_attention_qwen_shapes(kv_dtype):
    seqs = [(300, 1), (64, 64), (129, 1)]
    check_attention(seqs, num_heads=28, num_kv_heads=4, head_size=128, block_size=16,
                    kv_dtype=kv_dtype)


def test_paged_attention_noncontiguous_q_and_int64_indices():
    q, k_cache, v_cache, qsl, seq_lens, block_tables = make_batch(
        [(25, 5), (10, 1)], 6, 2, 64, 8, seed=3
    )
    qkv = torch.randn(q.shape[0], 3 * 6 * 64)
    qkv[:, : 6 * 64] = q.reshape(q.shape[0], -1)
    q_view = qkv[:, : 6 * 64].view(q.shape[0], 6, 64)
    assert not q_view.is_contiguous()
    want = reference.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, 0.1)
    got = cpu.paged_attention(
        q_view, k_cache, v_cache, qsl.long(), seq_lens.long(), block_tables.long(), 0.1
    )
    torch.testing.assert_close(got, want, **ATTN_TOL)


def test_paged_attention_rejects_bad_input():
    q, k_cache, v_cache, qsl, seq_lens, block_tables = make_batch([(20, 1)], 4, 2, 64, 8)
    with pytest.raises(TypeError):
        cpu.paged_attention(q.double(), k_cache, v_cache, qsl, seq_lens, block_tables, 0.1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu.paged_attention(q, k_cache.half(), v_cache.half(), qsl, seq_lens, block_tables, 0.1)
    with pytest.raises(TypeError, match="same dtype"):
        cpu.paged_attention(q, k_cache, v_cache.bfloat16(), qsl, seq_lens, block_tables, 0.1)
    with pytest.raises(ValueError, match="block table"):
        cpu.paged_attention(q, k_cache, v_cache, qsl, seq_lens + 100, block_tables, 0.1)
    bad_tables = block_tables.clone()
    bad_tables[0, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        cpu.paged_attention(q, k_cache, v_cache, qsl, seq_lens, bad_tables, 0.1)


def test_dispatch_picks_cpp_for_cpu_tensors():
    assert ops.available("cpp")
    assert ops.backend_for(torch.zeros(1)) is cpu
    with ops.use_backend("reference"):
        assert ops.backend_for(torch.zeros(1)) is reference


# ---------------------------------------------------------------- instruction-set variants


def cpu_flags() -> set[str]:
    """The CPU features Linux reports (those the OS supports too); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_variants_match_the_cpu(cpu_isa):
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    want = ["generic"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            want.append("avx512")
    assert _C.supported_isas() == want
    assert _C.isa() == cpu_isa


def run_import(isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLLM_CPU_ISA": isa}
    code = "import xllm._C as c; print(c.isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_env_forces_a_variant(cpu_isa):
    run = run_import(cpu_isa)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == cpu_isa
    run = run_import("sse9")
    assert run.returncode != 0
    assert "XLLM_CPU_ISA: instruction set 'sse9' is not one this CPU runs" in run.stderr
    with pytest.raises(ValueError, match="'sse9'"):
        _C.set_isa("sse9")


# ---------------------------------------------------------------- write_kv


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 300])
def test_write_kv(slot_dtype, num_tokens, kv_dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks, block_size, kv_heads, head_size = 40, 8, 3, 64
    shape = (num_blocks, block_size, kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen).to(kv_dtype)
    v_cache = torch.randn(shape, generator=gen).to(kv_dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    key = torch.randn((num_tokens, kv_heads, head_size), generator=gen)
    value = torch.randn((num_tokens, kv_heads, head_size), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(slot_dtype)
    slots[::3] = -1
    reference.write_kv(key, value, k_want, v_want, slots)
    cpu.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


# float32 values around bfloat16's rounding: ties (to even, up and down), just past them,
# signed zeros, subnormals, the largest finite values, overflow to inf, and infinities.
ROUNDING_VALUES = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 0.0, -0.0,
                   1e-40, -3e-39, 3.3895e38, 3.3961e38, -3.4e38, float("inf"), float("-inf"),
                   0.1, -2.7182817, 65504.0]


def test_write_kv_rounds_to_bfloat16_as_torch_does():
    values = torch.tensor(ROUNDING_VALUES + [float("nan")]).repeat(8)[:64]
    key = values.view(1, 1, 64)
    k_cache = torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    cpu.write_kv(key, -key, k_cache, v_cache, torch.tensor([5]))
    got, want = k_cache[1, 1, 0], values.to(torch.bfloat16)
    nan = values.isnan()
    assert got[nan].isnan().all()  # any NaN (torch's own choice of payload varies)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.equal(v_cache[1, 1, 0][~nan].view(torch.int16), (-want)[~nan].view(torch.int16))


def test_write_kv_strided_views_and_bad_slot():
    kv_heads, head_size = 2, 64
    k_cache = torch.zeros((4, 16, kv_heads, head_size))
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(5, 3 * kv_heads * head_size)
    key = qkv[:, kv_heads * head_size : 2 * kv_heads * head_size].view(5, kv_heads, head_size)
    value = qkv[:, 2 * kv_heads * head_size :].view(5, kv_heads, head_size)
    slots = torch.tensor([63, 0, -1, 17, 18])
    cpu.write_kv(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, kv_heads, head_size)
    flat_v = v_cache.view(-1, kv_heads, head_size)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[t]) and torch.equal(flat_v[s], value[t])
    assert flat_k.abs().sum(dim=(1, 2)).count_nonzero() == 4
    with pytest.raises(ValueError, match="slot"):
        cpu.write_kv(key, value, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 64]))


# ---------------------------------------------------------------- copy_blocks


# (num_layers, num_blocks, block_size, H_kv, D); 16 * 3 * 24 floats per block is no power of
# two; 30 SmolLM2 layers with 8 pairs pass the OpenMP threshold.
COPY_SHAPES = [(1, 12, 8, 1, 64), (2, 10, 16, 3, 24), (3, 20, 16, 2, 128), (30, 24, 16, 3, 64)]


@pytest.mark.parametrize("ids", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_pairs", [0, 1, 2, 8])
@pytest.mark.parametrize("shape", COPY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy_blocks(shape, num_pairs, ids):
    gen = torch.Generator().manual_seed(num_pairs + shape[1])
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k_cache[:, :, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("-inf")])
    block_mapping = block_pairs(shape[1], num_pairs, ids, gen)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    reference.copy_blocks(k_want, v_want, block_mapping)
    cpu.copy_blocks(k_cache, v_cache, block_mapping)
    assert torch.equal(bits(k_cache), bits(k_want)) and torch.equal(bits(v_cache), bits(v_want))
    untouched = torch.ones(shape[1], dtype=torch.bool)
    untouched[block_mapping[:, 1].long()] = False
    assert torch.equal(bits(k_cache[:, untouched]), bits(k_before[:, untouched]))
    assert torch.equal(bits(v_cache[:, untouched]), bits(v_before[:, untouched]))


@pytest.mark.parametrize("shape", COPY_SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_copy_blocks_bfloat16(shape):
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
    block_mapping = block_pairs(shape[1], 3, torch.int64, gen)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    reference.copy_blocks(k_want, v_want, block_mapping)
    cpu.copy_blocks(k_cache, v_cache, block_mapping)
    assert torch.equal(bits(k_cache), bits(k_want)) and torch.equal(bits(v_cache), bits(v_want))


def test_copy_blocks_through_ops_and_one_source_many_times():
    k_cache = torch.arange(2 * 5 * 4 * 1 * 8, dtype=torch.float32).view(2, 5, 4, 1, 8)
    v_cache = -k_cache
    k_before = k_cache.clone()
    ops.copy_blocks(k_cache, v_cache, torch.tensor([[1, 0], [1, 4], [1, 2]]))
    for dst in (0, 2, 4):
        assert torch.equal(k_cache[:, dst], k_before[:, 1])
        assert torch.equal(v_cache[:, dst], -k_before[:, 1])
    assert torch.equal(k_cache[:, [1, 3]], k_before[:, [1, 3]])


def test_copy_blocks_rejects_bad_input():
    k_cache = torch.randn(2, 6, 8, 2, 16)
    v_cache = torch.randn_like(k_cache)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    for pairs in ([[0, 6]], [[6, 0]], [[-1, 2]], [[0, 1], [2, -3]], [[0, 1], [10**6, 2]]):
        for ids in (torch.int32, torch.int64):
            with pytest.raises(ValueError, match="block id out of range"):
                cpu.copy_blocks(k_cache, v_cache, torch.tensor(pairs, dtype=ids))
    # Ids are checked before anything moves.
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    good = torch.tensor([[0, 1]])
    with pytest.raises(TypeError):
        cpu.copy_blocks(k_cache.double(), v_cache.double(), good)
    with pytest.raises(TypeError, match="same dtype"):
        cpu.copy_blocks(k_cache, v_cache.bfloat16(), good)
    with pytest.raises(TypeError):
        cpu.copy_blocks(k_cache, v_cache, good.float())
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        cpu.copy_blocks(k_cache, v_cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_layers"):
        cpu.copy_blocks(k_cache[0], v_cache[0], good)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.copy_blocks(k_cache.transpose(3, 4), v_cache.transpose(3, 4), good)


# ---------------------------------------------------------------- top-k logprobs


def check_topk(logits: torch.Tensor, k: int, token_ids: torch.Tensor | None = None) -> None:
    if token_ids is None:
        token_ids = torch.randint(0, logits.shape[1], (logits.shape[0],))
    want_v, want_i, want_c = reference.topk_logprobs(logits, k, token_ids)
    got_v, got_i, got_c = cpu.topk_logprobs(logits, k, token_ids)
    assert got_v.dtype == torch.float32 and got_i.dtype == torch.int64
    assert got_v.shape == (logits.shape[0], k) and got_c.shape == (logits.shape[0],)
    torch.testing.assert_close(got_v, want_v, **LOGPROB_TOL)
    torch.testing.assert_close(got_c, want_c, **LOGPROB_TOL)
    assert torch.equal(got_i, want_i)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("rows,vocab", [(1, 49152), (3, 152064), (8, 1000), (33, 4099)])
def test_topk_shapes(rows, vocab, k):
    gen = torch.Generator().manual_seed(rows * vocab + k)
    check_topk(torch.randn((rows, vocab), generator=gen) * 4, k)


def test_topk_small_vocab_k_equals_vocab():
    check_topk(torch.randn(4, 20), 20)
    check_topk(torch.randn(2, 1), 1, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("k", [1, 20])
def test_topk_ties_go_to_lower_token(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randint(0, 4, (6, 5000), generator=gen).float()
    check_topk(logits, k)
    flat = torch.zeros(2, 70000)  # every entry ties
    check_topk(flat, k)
    values, indices, _ = cpu.topk_logprobs(flat, k, torch.zeros(2, dtype=torch.long))
    assert indices[0].tolist() == list(range(k))


@pytest.mark.parametrize("k", [1, 20])
def test_topk_neg_inf_logits(k):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn((4, 30000), generator=gen)
    logits[:, ::2] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 12345] = 2.0
    logits[2, : 30000 - 5] = float("-inf")  # fewer finite entries than k
    token_ids = torch.tensor([0, 12345, 29999, 1])
    check_topk(logits, k, token_ids)
    _, _, chosen = cpu.topk_logprobs(logits, k, token_ids)
    assert chosen[0] == float("-inf") and chosen[1] == 0.0


def test_topk_rounding_ties_follow_the_logprobs():
    # Distinct logits that round to one logprob rank by token id, as the reference's do.
    logits = torch.zeros(2, 100000)
    logits[:, 50] = 1e-7
    logits[:, 60] = 2e-7
    logits[1, 3] = 5.0
    want_v, _, _ = reference.topk_logprobs(logits, 3, torch.zeros(2, dtype=torch.long))
    assert want_v[0, 0] == want_v[0, 2]  # the case is real: the three logprobs are equal
    check_topk(logits, 3)
    check_topk(logits, 1)


def test_topk_one_dominating_entry():
    logits = torch.zeros(3, 152064)
    logits[0, 100] = 1e4
    logits[1, 151999] = 80.0
    logits[2, 0] = 30.0
    check_topk(logits, 20, torch.tensor([100, 0, 0]))
    values, indices, chosen = cpu.topk_logprobs(logits, 1, torch.tensor([100, 0, 0]))
    assert indices[:, 0].tolist() == [100, 151999, 0]
    assert chosen[0] == 0.0


def test_topk_half_precision_and_strided_rows():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn((5, 2, 3000), generator=gen)[:, 1]
    check_topk(logits, 7)
    check_topk(torch.randn(3, 3000).bfloat16(), 4)


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError):
        cpu.topk_logprobs(torch.randn(2, 10), 11, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="token id"):
        cpu.topk_logprobs(torch.randn(2, 10), 3, torch.tensor([0, 10]))


# ---------------------------------------------------------------- greedy tokens


def check_argmax(logits: torch.Tensor) -> None:
    got = cpu.argmax(logits)
    assert got.dtype == torch.int64 and got.shape == (logits.shape[0],)
    assert torch.equal(got, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (64, 49152), (3, 152064), (5, 1), (9, 17),
                                        (33, 4099), (0, 10)])
def test_argmax_shapes(rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab + 1)
    check_argmax(torch.randn((rows, vocab), generator=gen) * 4)


def test_argmax_ties_infinities_and_nan_follow_torch():
    logits = torch.zeros(8, 1000)
    logits[0, [40, 7, 999]] = 3.0  # ties: the first index
    logits[1] = float("-inf")  # all -inf: index 0
    logits[2, [500, 5]] = float("inf")
    logits[3, 998] = 2.0
    logits[3, 999] = 5.0  # the best in the tail past the last whole vector
    logits[4, [300, 600]] = float("nan")  # the first NaN wins, as in torch
    logits[4, 10] = float("inf")
    logits[5, 999] = float("nan")  # NaN in the tail
    logits[6, 0] = -0.0
    logits[6, 1:] = -1.0
    logits[7, 17] = 1e-30  # a tiny margin still wins
    check_argmax(logits)
    assert cpu.argmax(logits).tolist() == [7, 0, 5, 999, 300, 999, 0, 17]


def test_argmax_half_precision_strided_rows_and_dispatch():
    gen = torch.Generator().manual_seed(12)
    check_argmax(torch.randn((5, 2, 3000), generator=gen)[:, 1])
    check_argmax(torch.randn((4, 3000), generator=gen).bfloat16())
    logits = torch.randn((6, 777), generator=gen)
    assert torch.equal(ops.argmax(logits), reference.argmax(logits))


def test_argmax_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        cpu.argmax(torch.randn(10))
    with pytest.raises(ValueError, match="one column"):
        cpu.argmax(torch.randn(3, 0))


# ---------------------------------------------------------------- beam pruning


def check_beam(beam_scores, cand_tokens, cand_logprobs, num_keep):
    want = reference.beam_prune(beam_scores, cand_tokens, cand_logprobs, num_keep)
    got = cpu.beam_prune(beam_scores, cand_tokens, cand_logprobs, num_keep)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("width", range(1, 9))
def test_beam_prune_widths(width):
    gen = torch.Generator().manual_seed(width)
    groups, cands = 64, 2 * width
    beam_scores = -torch.rand((groups, width), generator=gen) * 10
    cand_tokens = torch.randint(0, 152064, (groups, width, cands), generator=gen)
    cand_logprobs = -torch.rand((groups, width, cands), generator=gen) * 5
    for num_keep in {1, width, 2 * width, width * cands}:
        check_beam(beam_scores, cand_tokens, cand_logprobs, num_keep)


@pytest.mark.parametrize("width", [1, 3, 8])
def test_beam_prune_ties_and_dead_beams(width):
    gen = torch.Generator().manual_seed(100 + width)
    groups, cands = 9, 2 * width
    beam_scores = -torch.randint(0, 3, (groups, width), generator=gen).float()
    beam_scores[0, -1] = float("-inf")  # a padded, dead beam
    beam_scores[1, :] = float("-inf")
    cand_tokens = torch.randint(0, 6, (groups, width, cands), generator=gen)  # repeats
    cand_logprobs = -torch.randint(0, 3, (groups, width, cands), generator=gen).float()
    check_beam(beam_scores, cand_tokens, cand_logprobs, 2 * width)
    parents, tokens, scores = cpu.beam_prune(beam_scores, cand_tokens, cand_logprobs, 2 * width)
    # Best first; equal scores by lower beam, then lower token.
    for g in range(groups):
        columns = ((-scores[g]).tolist(), parents[g].tolist(), tokens[g].tolist())
        keys = list(zip(*columns, strict=True))
        assert keys == sorted(keys)


def test_beam_prune_rejects_too_many():
    with pytest.raises(ValueError):
        cpu.beam_prune(torch.zeros(1, 2), torch.zeros(1, 2, 3, dtype=torch.long),
                       torch.zeros(1, 2, 3), 7)  # fmt: skip
