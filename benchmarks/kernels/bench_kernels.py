"""Times each kernel backend (reference, C++, Triton) on serving shapes; prints speed-ups and GB/s.

Usage: python benchmarks/kernels/bench_kernels.py
       [attention|attention-tune|write_kv|copy_blocks|topk|beam|linear|all]
       [--quick] [--json PATH] [--threads N] [--block-order random|contiguous] [--dtype float32|...]

On a CUDA machine the tensors live on the GPU and the backends are reference and
triton (attention: triton beside torch's flash and cuDNN SDPA, each replaying a CUDA graph;
attention-tune: the Triton kernel's launch choices); otherwise on the CPU with reference
and cpp. Bandwidth counts the bytes a
kernel must read (K/V and q for attention, the logits for top-k; the blocks read and written
for copy_blocks); prefill reports
GFLOP/s of the causal attention (4 * heads * head_size per visible query-key pair).
`linear` (CPU only; on CUDA both sides would be cuBLAS) compares the C++ skinny GEMM with
torch's F.linear (the reference) and prints weight GB/s and GFLOP/s, then times all 121
projections of one SmolLM2 decode step.
CPU times are the fastest of repeated calls (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from xllm import ops


@dataclass
class Result:
    kernel: str
    shape: str
    backend: str
    ms: float
    speedup: float | None  # over the reference on the same shape; None when it was skipped
    rate: float  # GB/s or GFLOP/s
    unit: str


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    block_order: str
    min_time: float  # seconds of repeated calls per measurement

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Model:
    name: str
    num_heads: int
    num_kv_heads: int
    head_size: int


SMOLLM2 = Model("SmolLM2", 9, 3, 64)
QWEN2_7B = Model("Qwen2-7B", 28, 4, 128)
BLOCK_SIZE = 16
# On the CPU the reference is skipped above this much K/V per call (elements), it takes seconds.
CPU_REFERENCE_MAX_KV = 32 * 1024 * 4 * 128
SLOW_CALL_S = 1.0  # a call this slow is timed once


def backends(setup: Setup) -> list[str]:
    names = ["reference"]
    if setup.cuda and ops.available("triton"):
        names.append("triton")
    if not setup.cuda and ops.available("cpp"):
        names.append("cpp")
    return names


def sync(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], setup: Setup, max_reps: int = 500) -> float:
    """Milliseconds per call after a warm-up: CUDA, the mean of a timed loop; CPU, the fastest
    of at least three single calls (other work on a shared machine only ever adds time).
    A warm-up slower than SLOW_CALL_S is taken as the measurement. On CUDA an untimed call
    comes first: it may compile a new kernel variant (seconds), which is not the kernel's time."""
    sync(setup)
    if setup.cuda:
        fn()
        sync(setup)
    start = time.perf_counter()
    fn()
    sync(setup)
    first = time.perf_counter() - start
    if first > SLOW_CALL_S:
        return first * 1e3
    reps = max(3, min(max_reps, int(setup.min_time / max(first, 1e-6))))
    if setup.cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / reps
    best = first
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def run_backends(
    kernel: str,
    shape: str,
    setup: Setup,
    fn: Callable[[], object],
    amount: float,
    unit: str,
    skip_reference: bool = False,
) -> list[Result]:
    """Time fn under every backend; amount is bytes (GB/s) or FLOPs (GFLOP/s) per call."""
    results, ref_ms = [], None
    for name in backends(setup):
        if name == "reference" and skip_reference:
            continue
        with ops.use_backend(name):
            ms = time_call(fn, setup)
        if name == "reference":
            ref_ms = ms
        speedup = ref_ms / ms if ref_ms is not None else None
        result = Result(kernel, shape, name, ms, speedup, amount / ms / 1e6, unit)
        print_row(result)
        results.append(result)
    return results


def print_header() -> None:
    print(f"{'kernel':<11} {'shape':<44} {'backend':<10} {'ms':>10} {'speed-up':>9} {'rate':>14}")


def print_row(r: Result) -> None:
    speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
    rate = f"{r.rate:.3g} {r.unit}"
    print(f"{r.kernel:<11} {r.shape:<44} {r.backend:<10} {r.ms:>10.4f} {speedup:>9} {rate:>14}")
    sys.stdout.flush()


# ---------------------------------------------------------------- attention
# On CUDA the Triton kernel is timed beside torch's scaled_dot_product_attention with the
# flash and cuDNN backends (the peer) on contiguous K/V of the same shape, and every one of
# them is timed replaying a CUDA graph, the way the engine's decode steps run: launch
# overhead is not the kernel's. The reference (a Python loop over sequences) is left out.

PEERS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
GRAPH_CALLS = 20  # calls captured back to back in one timed graph
TARGET = 0.8  # issue 11: the Triton kernel at least this fraction of the faster peer's speed


def time_graph(fn: Callable[[], object], setup: Setup) -> float | None:
    """CUDA: ms per call, replaying a graph of GRAPH_CALLS calls; None if fn cannot be captured."""
    fn()  # compiles, and picks cuDNN's plan, outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(3, min(200, int(setup.min_time / max(time.perf_counter() - start, 1e-6))))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps / GRAPH_CALLS


def time_kernel(fn: Callable[[], object], setup: Setup) -> float:
    """A CUDA graph's time where fn can be captured, else a timed loop's."""
    ms = time_graph(fn, setup) if setup.cuda else None
    return time_call(fn, setup) if ms is None else ms


def attention_inputs(
    model: Model, seqs: list[tuple[int, int]], setup: Setup, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q, caches and metadata for sequences [(seq_len, q_len), ...] in a paged cache.

    The random values are drawn on the device itself (gigabytes at long contexts)."""
    gen = torch.Generator(setup.device).manual_seed(seed)
    blocks = [math.ceil(s / BLOCK_SIZE) for s, _ in seqs]
    max_blocks, num_blocks = max(blocks), sum(blocks)
    shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_size)
    randn = partial(torch.randn, generator=gen, device=setup.device, dtype=setup.dtype)
    k_cache, v_cache = randn(shape), randn(shape)
    if setup.block_order == "random":
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(num_blocks)
    block_tables = torch.zeros((len(seqs), max_blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        block_tables[b, :n] = order[used : used + n].int()
        used += n
    q_lens = [q for _, q in seqs]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    q = randn((sum(q_lens), model.num_heads, model.head_size))
    tensors = (q, k_cache, v_cache, qsl, seq_lens, block_tables)
    return tuple(t.to(setup.device) for t in tensors)


def sdpa_peers(
    model: Model, batch: int, q_len: int, context: int, setup: Setup
) -> dict[str, Callable[[], object]]:
    """The peers: torch's SDPA pinned to each backend of PEERS, on one set of contiguous
    [B, H, T, D] tensors, GQA as is; a backend that refuses the shape is left out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    randn = partial(torch.randn, device=setup.device, dtype=setup.dtype)
    q = randn(batch, model.num_heads, q_len, model.head_size)
    k = randn(batch, model.num_kv_heads, context, model.head_size)
    v = randn(batch, model.num_kv_heads, context, model.head_size)

    def call(backend: str) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=q_len > 1, enable_gqa=True
            )

    peers = {}
    for name, backend in PEERS.items():
        try:
            call(backend)
        except RuntimeError as error:  # this backend does not take the shape
            print(f"# {backend} refused {model.name} B={batch} q={q_len} ctx={context}: "
                  f"{str(error).splitlines()[0][:120]}")  # fmt: skip
            continue
        peers[name] = partial(call, backend)
    return peers


def run_with_peers(
    shape: str, setup: Setup, call: Callable[[], object], peers: dict, amount: float, unit: str
) -> list[Result]:
    """Triton and each peer on one shape; Triton's speed-up is over the faster peer."""
    timed = {name: time_kernel(fn, setup) for name, fn in peers.items()}
    with ops.use_backend("triton"):
        ms = time_kernel(call, setup)
    best = min(timed.values(), default=None)
    results = [Result("attention", shape, "triton", ms, best / ms if best else None,
                      amount / ms / 1e6, unit)]  # fmt: skip
    results += [Result("attention", shape, name, peer_ms, None, amount / peer_ms / 1e6, unit)
                for name, peer_ms in timed.items()]  # fmt: skip
    for result in results:
        print_row(result)
    return results


def bench_decode(model: Model, batch: int, context: int, setup: Setup) -> list[Result]:
    inputs = attention_inputs(model, [(context, 1)] * batch, setup)
    q, k_cache = inputs[0], inputs[1]
    kv_elems = batch * context * model.num_kv_heads * model.head_size
    amount = 2 * kv_elems * k_cache.element_size() + q.numel() * q.element_size()
    shape = f"{model.name} decode B={batch} ctx={context}"
    call = partial(ops.paged_attention, *inputs, model.head_size**-0.5)
    if setup.cuda:
        peers = sdpa_peers(model, batch, 1, context, setup)
        return run_with_peers(shape, setup, call, peers, amount, "GB/s")
    skip = kv_elems > CPU_REFERENCE_MAX_KV
    return run_backends("attention", shape, setup, call, amount, "GB/s", skip)


def bench_prefill(model: Model, length: int, setup: Setup, skip_reference: bool) -> list[Result]:
    inputs = attention_inputs(model, [(length, length)], setup)
    pairs = length * (length + 1) / 2  # visible (query, key) pairs under the causal mask
    flops = 4 * model.num_heads * model.head_size * pairs
    shape = f"{model.name} prefill {length}"
    call = partial(ops.paged_attention, *inputs, model.head_size**-0.5)
    if setup.cuda:
        peers = sdpa_peers(model, 1, length, length, setup)
        return run_with_peers(shape, setup, call, peers, flops, "GFLOP/s")
    return run_backends("attention", shape, setup, call, flops, "GFLOP/s", skip_reference)


def bench_mixed(model: Model, setup: Setup) -> list[Result]:
    """One 512-token prefill chunk after a 1,536-token prefix, with 31 decodes of 1,024."""
    seqs = [(2048, 512)] + [(1024, 1)] * 31
    inputs = attention_inputs(model, seqs, setup)
    pairs = sum(q_len * (s - q_len) + q_len * (q_len + 1) / 2 for s, q_len in seqs)
    flops = 4 * model.num_heads * model.head_size * pairs
    shape = f"{model.name} mixed 512/2048 + 31 x 1024"
    call = partial(ops.paged_attention, *inputs, model.head_size**-0.5)
    if setup.cuda:
        return run_with_peers(shape, setup, call, {}, flops, "GFLOP/s")
    return run_backends("attention", shape, setup, call, flops, "GFLOP/s")


def print_peer_summary(results: list[Result]) -> None:
    """How many shapes meet the target against the faster peer, and the worst ones."""
    rows = [r for r in results if r.backend == "triton" and r.speedup is not None]
    if not rows:
        return
    met = [r for r in rows if r.speedup >= TARGET]
    print(f"# triton >= {TARGET}x the faster SDPA peer on {len(met)} of {len(rows)} shapes")
    for r in sorted(rows, key=lambda r: r.speedup)[:5]:
        print(f"#   worst: {r.shape}: {r.speedup:.2f}x")


def bench_attention(setup: Setup) -> list[Result]:
    results = []
    if setup.cuda:
        contexts = [1024, 4096] if setup.quick else [1024, 4096, 16384, 32768]
        grid = {SMOLLM2: ([1, 8, 32, 64], contexts), QWEN2_7B: ([1, 8, 32, 64], contexts)}
        prefill = [(SMOLLM2, False), (QWEN2_7B, False)]
        lengths = [2048, 8192]
    elif setup.quick:
        grid = {SMOLLM2: ([1, 32], [1024]), QWEN2_7B: ([8], [1024])}
        prefill, lengths = [(SMOLLM2, False)], [2048]
    else:
        grid = {SMOLLM2: ([1, 8, 32, 64], [128, 1024, 4096]),
                QWEN2_7B: ([1, 8, 32], [128, 1024, 4096])}  # fmt: skip
        prefill, lengths = [(SMOLLM2, False), (QWEN2_7B, True)], [2048]
    for model, (batches, contexts) in grid.items():
        for batch in batches:
            for context in contexts:
                results += bench_decode(model, batch, context, setup)
                if setup.cuda:
                    torch.cuda.empty_cache()
    for model, skip_reference in prefill:
        for length in lengths:
            results += bench_prefill(model, length, setup, skip_reference)
    if not setup.quick:
        results += bench_mixed(SMOLLM2, setup)
    print_peer_summary(results)
    return results


# Launch choices the tuning sweep tries: (block_m, tile_n, num_warps, num_stages).
DECODE_CONFIGS = [(16, 32, 4, 3), (16, 64, 4, 2), (16, 64, 4, 3), (16, 64, 4, 4),
                  (16, 64, 2, 3), (16, 64, 8, 3), (16, 128, 4, 2), (16, 128, 4, 3),
                  (16, 128, 8, 3)]  # fmt: skip
PREFILL_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 128, 4, 3),
                   (64, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                   (128, 128, 8, 2)]  # fmt: skip
SPLIT_SCALES = [0.25, 0.5, 1, 2]  # times the default number of KV splits


def bench_attention_tune(setup: Setup) -> list[Result]:
    """CUDA: the Triton kernel's launch choices on a few shapes, best first per shape."""
    from xllm.ops import cuda as tri

    if not setup.cuda:
        raise SystemExit("attention-tune needs a CUDA GPU")
    results = []
    decode = [(QWEN2_7B, 1, 32768), (QWEN2_7B, 8, 4096), (QWEN2_7B, 64, 4096),
              (SMOLLM2, 8, 16384), (SMOLLM2, 32, 1024), (SMOLLM2, 64, 32768)]  # fmt: skip
    cases = [(m, [(c, 1)] * b, f"{m.name} decode B={b} ctx={c}", DECODE_CONFIGS)
             for m, b, c in decode]  # fmt: skip
    cases += [(m, [(n, n)], f"{m.name} prefill {n}", PREFILL_CONFIGS)
              for m in (QWEN2_7B, SMOLLM2) for n in (2048, 8192)]  # fmt: skip
    for model, seqs, name, configs in cases:
        inputs = attention_inputs(model, seqs, setup)
        launches = [dict(zip(("block_m", "tile_n", "num_warps", "num_stages"), c))
                    for c in configs]  # fmt: skip
        if all(q == 1 for _, q in seqs):  # decode: the split count too
            default_splits = tri._choose_splits(setup.device, len(seqs) * model.num_kv_heads)
            launches += [{"num_splits": max(1, int(default_splits * f))} for f in SPLIT_SCALES]
            name += f" (default splits {default_splits})"
        timed = []
        for launch in launches:
            call = partial(tri.paged_attention_with, *inputs, model.head_size**-0.5, **launch)
            try:
                timed.append((time_kernel(call, setup), launch))
            except Exception as error:  # a config that does not compile (shared memory)
                print(f"# {name} {launch}: {type(error).__name__} {str(error)[:100]}")
        timed.sort(key=lambda t: t[0])
        print(f"# {name}")
        for ms, launch in timed:
            print(f"#   {ms * 1e3:9.1f} us  {launch}")
            results.append(Result("attention", f"{name} {launch}", "triton", ms, None, 0, "-"))
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- write_kv


def bench_write_kv(setup: Setup) -> list[Result]:
    results = []
    for model, tokens in [(SMOLLM2, 64), (SMOLLM2, 2048), (QWEN2_7B, 2048)]:
        num_blocks = 4096 // BLOCK_SIZE * 8
        shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_size)
        k_cache = torch.zeros(shape, dtype=setup.dtype, device=setup.device)
        v_cache = torch.zeros_like(k_cache)
        row = (tokens, model.num_kv_heads, model.head_size)
        key = torch.randn(row).to(setup.device, setup.dtype)
        value = torch.randn(row).to(setup.device, setup.dtype)
        slots = torch.randperm(num_blocks * BLOCK_SIZE)[:tokens].to(setup.device)
        amount = 4 * key.numel() * key.element_size()  # read key/value, write both
        call = partial(ops.write_kv, key, value, k_cache, v_cache, slots)
        results += run_backends("write_kv", f"{model.name} {tokens} tokens", setup, call, amount,
                                "GB/s")  # fmt: skip
    return results


# ---------------------------------------------------------------- copy_blocks


def bench_copy_blocks(setup: Setup) -> list[Result]:
    """Beam forks: P blocks copied in every layer of the stacked K and V caches."""
    results = []
    layers = {SMOLLM2: 30, QWEN2_7B: 28}
    for model in [SMOLLM2] if setup.quick else [SMOLLM2, QWEN2_7B]:
        num_blocks = 128
        shape = (layers[model], num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_size)
        k_cache = torch.ones(shape, dtype=setup.dtype, device=setup.device)  # pages touched
        v_cache = torch.ones_like(k_cache)
        block_bytes = k_cache[0, 0].numel() * k_cache.element_size()
        for pairs in [1, 8, 64]:
            perm = torch.randperm(num_blocks)
            mapping = torch.stack([perm[:pairs], perm[pairs : 2 * pairs]], dim=1)
            amount = 2 * 2 * layers[model] * pairs * block_bytes  # K and V, read and write
            call = partial(ops.copy_blocks, k_cache, v_cache, mapping.to(setup.device))
            shape_name = f"{model.name} {layers[model]} layers, {pairs} blocks"
            results += run_backends("copy_blocks", shape_name, setup, call, amount, "GB/s")
    return results


# ---------------------------------------------------------------- top-k logprobs


def unfused_topk(logits: torch.Tensor, k: int) -> object:
    """The plain torch baseline: the full log-softmax, then top-k."""
    return torch.topk(torch.log_softmax(logits, dim=-1), k)


def bench_topk(setup: Setup) -> list[Result]:
    results = []
    rows_grid = [1, 32] if setup.quick else [1, 4, 16, 32, 64]
    for vocab in [49152, 152064]:
        for rows in rows_grid:
            gen = torch.Generator().manual_seed(rows)
            logits = (torch.randn((rows, vocab), generator=gen) * 3).to(setup.device)
            token_ids = torch.randint(0, vocab, (rows,), generator=gen).to(setup.device)
            amount = logits.numel() * logits.element_size()
            k = 20
            call = partial(ops.topk_logprobs, logits, k, token_ids)
            shape = f"{rows} x {vocab} k={k}"
            found = run_backends("topk", shape, setup, call, amount, "GB/s")
            ms = time_call(partial(unfused_topk, logits, k), setup)
            ref_ms = found[0].ms if found and found[0].backend == "reference" else None
            base = Result("topk", shape, "torch", ms, ref_ms / ms if ref_ms else None,
                          amount / ms / 1e6, "GB/s")  # fmt: skip
            print_row(base)
            for r in found:
                if r.backend != "reference":
                    print(f"{'':<11} {'':<44} {r.backend + ' vs torch':<20} {ms / r.ms:>8.1f}x")
            results += found + [base]
    return results


# ---------------------------------------------------------------- beam pruning


def bench_beam(setup: Setup) -> list[Result]:
    results = []
    groups = 64
    for width in [1, 2, 4, 8]:
        cands = 2 * width
        gen = torch.Generator().manual_seed(width)
        beam_scores = (-torch.rand((groups, width), generator=gen) * 10).to(setup.device)
        tokens = torch.randint(0, 152064, (groups, width, cands), generator=gen).to(setup.device)
        logprobs = (-torch.rand((groups, width, cands), generator=gen) * 5).to(setup.device)
        amount = beam_scores.numel() * 4 + tokens.numel() * 8 + logprobs.numel() * 4
        call = partial(ops.beam_prune, beam_scores, tokens, logprobs, 2 * width)
        shape = f"{groups} groups W={width} C={cands}"
        results += run_backends("beam", shape, setup, call, amount, "GB/s")
    return results


# ---------------------------------------------------------------- linear

# (K, N) of the projections: SmolLM2-135M qkv, o, gate_up, down, lm_head; Qwen2-7B qkv, gate_up.
LINEAR_SHAPES = [("SmolLM2", 576, 960), ("SmolLM2", 576, 576), ("SmolLM2", 576, 3072),
                 ("SmolLM2", 1536, 576), ("SmolLM2", 576, 49152),
                 ("Qwen2-7B", 3584, 4608), ("Qwen2-7B", 3584, 37888)]  # fmt: skip
SMOLLM2_LAYERS = 30
# On the CPU the reference is skipped above this many multiply-adds (F.linear takes ~1 s).
CPU_REFERENCE_MAX_MACS = 64 * 3584 * 37888


def print_linear_row(r: Result, gflops: float) -> None:
    speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
    print(f"{r.kernel:<11} {r.shape:<44} {r.backend:<10} {r.ms:>10.4f} {speedup:>9} "
          f"{r.rate:>8.1f} GB/s {gflops:>7.1f} GFLOP/s")  # fmt: skip
    sys.stdout.flush()


def time_linear(shape: str, setup: Setup, fn: Callable[[], object], weight_bytes: float,
                flops: float, skip_reference: bool = False) -> list[Result]:  # fmt: skip
    results, ref_ms = [], None
    for name in backends(setup):
        if name == "reference" and skip_reference:
            continue
        with ops.use_backend(name):
            ms = time_call(fn, setup)
        ref_ms = ms if name == "reference" else ref_ms
        speedup = ref_ms / ms if ref_ms is not None else None
        result = Result("linear", shape, name, ms, speedup, weight_bytes / ms / 1e6, "GB/s")
        print_linear_row(result, flops / ms / 1e6)
        results.append(result)
    return results


def decode_step_linears(m: int, layer_weights: list, lm_head: torch.Tensor) -> None:
    """The 121 projections of one SmolLM2 decode step at batch m, in model order (inputs are
    random: only the matmuls are timed)."""
    x, act = torch.randn((m, 576)), torch.randn((m, 1536))
    for qkv, o, gate_up, down in layer_weights:
        ops.linear(x, qkv)
        ops.linear(x, o)
        ops.linear(x, gate_up)
        ops.linear(act, down)
    ops.linear(x, lm_head)


def bench_linear(setup: Setup) -> list[Result]:
    if setup.cuda:
        print("linear: skipped on CUDA (the backend is F.linear, i.e. cuBLAS, on both sides)")
        return []
    results = []
    rows_grid = [1, 16] if setup.quick else [1, 4, 16, 32, 64]
    shapes = LINEAR_SHAPES[:5] if setup.quick else LINEAR_SHAPES
    for model, k, n in shapes:
        weight = torch.randn((n, k)) * k**-0.5
        for m in rows_grid:
            x = torch.randn((m, k))
            call = partial(ops.linear, x, weight)
            skip = m * n * k > CPU_REFERENCE_MAX_MACS
            shape = f"{model} M={m} K={k} N={n}"
            results += time_linear(shape, setup, call, n * k * 4, 2 * m * n * k, skip)
        del weight
    # One decode step: every layer has its own weights, so they stream from memory as in serving.
    layer_weights = [tuple(torch.randn(shape) * 0.04 for shape in
                           [(960, 576), (576, 576), (3072, 576), (576, 1536)])
                     for _ in range(SMOLLM2_LAYERS)]  # fmt: skip
    lm_head = torch.randn((49152, 576)) * 0.04
    total_bytes = 4 * (sum(w.numel() for ws in layer_weights for w in ws) + lm_head.numel())
    for m in [1, 16]:
        call = partial(decode_step_linears, m, layer_weights, lm_head)
        shape = f"SmolLM2 decode step, 121 linears, M={m}"
        results += time_linear(shape, setup, call, total_bytes, 2 * m * total_bytes / 4)
    return results


BENCHES = {"attention": bench_attention, "attention-tune": bench_attention_tune,
           "write_kv": bench_write_kv,
           "copy_blocks": bench_copy_blocks, "topk": bench_topk, "beam": bench_beam,
           "linear": bench_linear}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all"])
    parser.add_argument("--quick", action="store_true", help="a small grid (CPU: seconds)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--block-order",
        choices=["random", "contiguous"],
        default="random",
        help="how the cache blocks of a sequence are spread (default random)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="KV cache and q dtype (default float32 on CPU, float16 on CUDA)",
    )
    parser.add_argument(
        "--min-time", type=float, default=0.2, help="seconds of repeated calls per measurement"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch and the C++ kernels (one OpenMP pool)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    dtype_name = args.dtype or ("float16" if cuda else "float32")
    setup = Setup(
        device=torch.device("cuda" if cuda else "cpu"),
        dtype=getattr(torch, dtype_name),
        quick=args.quick,
        block_order=args.block_order,
        min_time=args.min_time,
    )
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'CPU'}"
    threads = torch.get_num_threads()
    print(f"# device {where} ({setup.device}), {threads} threads, dtype {dtype_name}, "
          f"backends {', '.join(backends(setup))}, blocks {args.block_order}")  # fmt: skip
    print_header()
    results = []
    names = [name for name in BENCHES if name != "attention-tune"]  # "all": no tuning sweep
    for name in names if args.which == "all" else [args.which]:
        results += BENCHES[name](setup)
    if args.json:
        with open(args.json, "w") as f:
            info = {"device": where, "dtype": dtype_name, "quick": args.quick}
            json.dump({"setup": info, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
