#!/usr/bin/env bash
# Engine check for one lent GPU (H100/H200), in one go, under 8 minutes:
#   1. device facts; 2. setup: the source tree on PYTHONPATH, which packages exist, whether the
#   engine and its tests import; 3. the CUDA engine tests (tests/engine/test_cuda_engine.py);
#   4. the attention kernel beside torch's flash and cuDNN SDPA, the peer
#   (benchmarks/kernels/bench_kernels.py attention); with XLLM_TUNE=1, the Triton attention
#   kernel's launch choices (bench_kernels.py attention-tune); 5. offline throughput, engine
#   vs transformers (benchmarks/gpu_throughput.py); 6. the kernel tests, compiled.
# The engine's own steps come first: the kernels have their own, longer check
# (benchmarks/kernels/gpu_check.sh). A step that fails or times out does not stop the next;
# each runs under `timeout`, trimmed to what is left of XLLM_CHECK_BUDGET (default 465 s), and
# a summary ends the run.
#
# Usage, from anywhere: bash benchmarks/gpu_check.sh [OUT_DIR]
# Assumes the machine's python3 has torch, triton, transformers and pytest (nothing can be
# fetched there); models and tokenizers are built on the spot (tests/engine/synthetic.py).
# XLLM_GPU_INSTALL=1 first tries `pip install -e .` (builds the C++ kernels: a minute or
# two, and only the kernel tests use them); by default the source tree is put on PYTHONPATH.
# Logs land in OUT_DIR (default $OUT, else /tmp/xllm_gpu_check): 7 files (8 with XLLM_TUNE=1).

set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/xllm_gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
BUDGET=${XLLM_CHECK_BUDGET:-465}
SETUP_LOG="$OUT_DIR/setup.txt"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TRITON_DEFAULT_FP_FUSION=1
SUMMARY=()

say() { echo "$*" | tee -a "$SETUP_LOG"; }

# run_step NAME LIMIT LOG COMMAND...: COMMAND under `timeout` (LIMIT seconds, or what is left
# of the budget), its output shown and written to LOG; its outcome goes into the summary.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS - 10))
    echo
    echo "=== $name (limit $limit s, $SECONDS s elapsed) ==="
    if ((left < 20)); then
        echo "skipped: only $left s of the budget left"
        SUMMARY+=("$(printf '%-22s %s' "$name" "SKIPPED (budget spent)")")
        return
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS status
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after $limit s" ;;
        5) status="no tests ran" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    # pytest's last line ("3 passed, 1 skipped in 40s") says more than its exit status
    local tail
    tail=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$log" | tail -n 1 | tr -d '=')
    SUMMARY+=("$(printf '%-22s %-22s %4d s  %s %s' "$name" "$status" $((SECONDS - start)) \
        "$(basename "$log")" "${tail:+-- ${tail# }}")")
}

echo "=== device ===" | tee "$SETUP_LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
    | tee -a "$SETUP_LOG" || say "nvidia-smi failed"
$PY - <<'EOF' 2>&1 | tee -a "$SETUP_LOG"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton MISSING:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs",
          "capability", torch.cuda.get_device_capability(0))
else:
    print("torch sees NO CUDA device: the engine tests will skip, the benchmarks fail")
EOF

echo; say "=== setup ==="
if [ "${XLLM_GPU_INSTALL:-0}" = 1 ]; then
    if timeout 240 $PY -m pip install -q -e . --no-build-isolation --no-deps \
            >>"$SETUP_LOG" 2>&1; then
        say "pip install -e . done"
    else
        say "pip install -e . failed (its output is in setup.txt)"
    fi
fi
NO_CPP=()
SHIM=$(mktemp -d)
if ! $PY -c "import xllm_triton, xllm.ops.cuda" >/dev/null 2>&1; then
    # No install: expose kernels/ under its package name and use the source tree as is.
    ln -s "$PWD/kernels" "$SHIM/xllm_triton"
    say "xllm is not installed: the source tree is used as is, the C++ kernel tests left out"
    NO_CPP=(--ignore=tests/kernels/test_cpu_kernels.py --ignore=tests/kernels/test_cpu_linear.py
            --ignore=tests/kernels/test_cpu_quant.py --ignore=tests/kernels/test_cpu_fused.py)
fi
if ! $PY -c "import PIL.Image" >/dev/null 2>&1; then
    # No stand-in: transformers takes any importable PIL.Image for Pillow and then needs more.
    say "Pillow is MISSING: xllm.engine.images imports it when the engine loads, so the engine"
    say "tests and the throughput step will fail; carry a pillow wheel (see the device README)"
fi
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF' 2>&1 | tee -a "$SETUP_LOG"
import importlib, sys
# What the engine, its tests and the benchmarks need, then the server's and the suite's extras.
needed = ["torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "jinja2",
          "tqdm", "PIL", "pytest"]
extras = ["pytest_timeout", "requests", "fastapi", "uvicorn", "pydantic", "httpx", "gguf",
          "accelerate", "pybind11"]
for group, names in (("needed", needed), ("not needed here", extras)):
    for name in names:
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", "")
            print(f"{group:>15}: {name:<15} {version}")
        except Exception as error:
            print(f"{group:>15}: {name:<15} MISSING ({type(error).__name__}: {error})")
sys.path.insert(0, "tests/engine")
for name in ("xllm_triton", "xllm.ops.cuda", "xllm.engine.llm", "synthetic", "hf_oracle"):
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as error:
        missing = getattr(error, "name", None)
        print(f"import {name}: FAILED ({type(error).__name__}: {error})"
              + (f" -- the module {missing!r} is missing" if missing else ""))
try:
    import xllm.ops.cuda as c

    print("Triton kernels interpreted:", c.INTERPRETED, "(should be False)")
except Exception:
    pass
EOF
if $PY -c "import pytest" >/dev/null 2>&1; then
    HAVE_PYTEST=1
else
    HAVE_PYTEST=0
    say "pytest is MISSING: the test steps are skipped"
fi
# --confcutdir: only the conftest.py of the tests' own folder loads, not tests/conftest.py
# (the API tests' server fixtures, which import requests).
PYTEST=($PY -m pytest -q -rfEs -p no:cacheprovider --durations=5)

if ((HAVE_PYTEST)); then
    run_step "engine tests (CUDA)" 150 "$OUT_DIR/engine_tests.txt" \
        "${PYTEST[@]}" -s --confcutdir=tests/engine tests/engine/test_cuda_engine.py
else
    SUMMARY+=("engine tests (CUDA)    SKIPPED (no pytest)")
fi

run_step "attention vs SDPA" 150 "$OUT_DIR/bench_attention.txt" \
    $PY benchmarks/kernels/bench_kernels.py attention --dtype bfloat16 --min-time 0.05

if [ "${XLLM_TUNE:-0}" = 1 ]; then
    run_step "attention tuning" 150 "$OUT_DIR/tune_attention.txt" \
        $PY benchmarks/kernels/bench_kernels.py attention-tune --dtype bfloat16 --min-time 0.03
fi

run_step "throughput" 150 "$OUT_DIR/throughput.txt" \
    $PY benchmarks/gpu_throughput.py --json "$OUT_DIR/throughput.json"

if ((HAVE_PYTEST)); then
    run_step "kernel tests" 200 "$OUT_DIR/kernel_tests.txt" \
        "${PYTEST[@]}" --confcutdir=tests/kernels tests/kernels "${NO_CPP[@]}"
else
    SUMMARY+=("kernel tests           SKIPPED (no pytest)")
fi

{
    echo
    echo "=== summary ($SECONDS s) ==="
    printf '%s\n' "${SUMMARY[@]}"
    echo "logs in $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
