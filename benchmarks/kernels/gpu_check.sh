#!/usr/bin/env bash
# Kernel check for one lent GPU (H100/H200): device facts, the kernel tests compiled (no
# TRITON_INTERPRET), a Triton launch sweep on the issue's target shapes, then the benchmarks.
#
# Usage, from anywhere: bash benchmarks/kernels/gpu_check.sh [OUT_DIR]
# Assumes the machine's python3 already has torch and triton (nothing can be fetched there);
# `pip install -e .` is best effort, and without it the source tree is put on PYTHONPATH.
# Logs land in OUT_DIR (default $OUT, else /tmp/xllm_gpu_check). About 6-9 minutes, most of it
# Triton compiling each kernel specialization once.

set -u
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-/tmp/xllm_gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

step() { echo; echo "=== $* ==="; }

step "device"
nvidia-smi || echo "nvidia-smi failed"
$PY - <<'EOF' || { echo "torch/triton missing or no CUDA: stopping"; exit 1; }
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "torch sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print(p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs",
      "capability", torch.cuda.get_device_capability(0))
EOF

step "install (best effort)"
if ! timeout 300 $PY -m pip install -q -e . --no-build-isolation --no-deps \
        >"$OUT_DIR/pip_install.log" 2>&1; then
    echo "pip install -e . failed (tail of $OUT_DIR/pip_install.log):"
    tail -n 5 "$OUT_DIR/pip_install.log"
fi
NO_CPP=()
if ! $PY -c "import xllm_triton, xllm.ops.cuda" 2>/dev/null; then
    # No install: expose kernels/ under its package name and use the source tree as is.
    SHIM=$(mktemp -d)
    ln -s "$PWD/kernels" "$SHIM/xllm_triton"
    export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "using the source tree (PYTHONPATH=$PYTHONPATH); the C++ tests are left out"
    NO_CPP=(--ignore=tests/kernels/test_cpu_kernels.py --ignore=tests/kernels/test_cpu_linear.py)
fi
$PY -c "import xllm.ops.cuda as c; print('xllm.ops.cuda ok, interpreted:', c.INTERPRETED)"

step "kernel tests, compiled"
timeout 420 $PY -m pytest -q -rs tests/kernels "${NO_CPP[@]}" -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/pytest_kernels.txt"

step "triton sweep: decode split-KV and top-k selection"
timeout 240 $PY - <<'EOF' 2>&1 | tee "$OUT_DIR/triton_sweep.txt"
import torch
import triton.testing
from xllm.ops import cuda as tri, reference as ref

props = torch.cuda.get_device_properties(0)
peak = 4.8e12 if "H200" in props.name else 3.35e12  # HBM bytes/s of the card, reads counted
print(f"{props.name}: peak taken as {peak / 1e12:.2f} TB/s")

def decode_case(batch, ctx, heads, kv_heads, head_size, block=16, dtype=torch.float16):
    blocks = ctx // block
    num_blocks = batch * blocks
    k = torch.randn(num_blocks, block, kv_heads, head_size, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, head_size, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    nbytes = 2 * num_blocks * block * kv_heads * head_size * k.element_size()
    return (q, k, v, qsl, lens, tables, head_size**-0.5), nbytes

def report(ms, nbytes):
    rate = nbytes / (ms * 1e-3)
    return f"{ms * 1e3:.0f} us {rate / 1e9:.0f} GB/s = {rate / peak:.0%} of peak"

shapes = [("qwen2-7b", 28, 4, 128, [(64, 4096), (8, 4096), (1, 4096)]),
          ("smollm2", 9, 3, 64, [(32, 1024), (1, 4096)])]
for name, heads, kv_heads, head_size, batches in shapes:
    for batch, ctx in batches:
        args, nbytes = decode_case(batch, ctx, heads, kv_heads, head_size)
        expected = ref.paged_attention(*args).float()
        cells = []
        for splits, tile in [(None, None), (1, 64), (4, 64), (16, 64), (4, 32), (16, 32)]:
            fn = lambda: tri.paged_attention_with(*args, num_splits=splits, tile_n=tile)
            err = (fn().float() - expected).abs().max().item()
            cells.append((triton.testing.do_bench(fn, warmup=10, rep=50), splits, tile, err))
        best = min(cells[1:])
        print(f"{name} decode fp16 b={batch} ctx={ctx}: auto {report(cells[0][0], nbytes)}"
              f" | best of sweep splits={best[1]} tile={best[2]} {report(best[0], nbytes)}"
              f" | max err {max(c[3] for c in cells):.1e}")

for vocab in [49152, 152064]:
    logits = torch.randn(32, vocab, device="cuda")
    ids = torch.randint(0, vocab, (32,), device="cuda")
    torch_ms = triton.testing.do_bench(
        lambda: torch.topk(torch.log_softmax(logits, -1), 20), warmup=10, rep=50)
    line = f"topk 32x{vocab} k=20: torch {torch_ms * 1e3:.0f} us"
    fn = lambda: tri.topk_logprobs(logits, 20, ids)
    same = torch.equal(fn()[1], ref.topk_logprobs(logits, 20, ids)[1])
    ms = triton.testing.do_bench(fn, warmup=10, rep=50)
    line += (f" | triton {ms * 1e3:.0f} us"
             f" x{torch_ms / ms:.1f} ({logits.numel() * 8 / ms / 1e6:.0f} GB/s, 2 reads)"
             f"{'' if same else ' MISMATCH'}")
    print(line)
EOF

step "benchmarks"
timeout 300 $PY benchmarks/kernels/bench_kernels.py all --json "$OUT_DIR/bench.json" 2>&1 \
    | tee "$OUT_DIR/bench.txt"
echo; echo "logs in $OUT_DIR"
