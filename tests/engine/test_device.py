"""Where the engine runs: --device and --dtype, the CUDA-graph batch ladder, input staging,
host tensors in huge pages."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xllm.model.cuda_graphs import batch_ladder
from xllm.model.device import (
    HUGE_PAGE,
    Staging,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
    zeros,
)

NO_CUDA = not torch.cuda.is_available()


def test_auto_device_follows_torch():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("mps")


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16
    for name in ("bfloat16", "float16"):  # refused at startup, not with a 500 per request
        with pytest.raises(ValueError, match="not served on the CPU"):
            resolve_dtype(name, cpu)
    with pytest.raises(ValueError, match="one of"):
        resolve_dtype("int8", cpu)


def test_kv_cache_dtypes():
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.float16) == torch.float16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="one of auto, bfloat16"):
        resolve_kv_cache_dtype("fp8", torch.float32)


@pytest.mark.parametrize("most", [1, 2, 5, 16, 20, 64, 256])
def test_batch_ladder_holds_every_batch(most):
    sizes = batch_ladder(most)
    assert sizes == sorted(set(sizes)) and sizes[-1] == most and sizes[0] == 1
    for n in range(1, most + 1):
        assert any(s >= n for s in sizes)
    assert len(sizes) <= 4 + most // 16 + 1


def test_staging_on_the_cpu_is_the_array():
    staging = Staging(torch.device("cpu"))
    array = np.arange(10, dtype=np.int64)
    tensor = staging("ids", array)
    assert tensor.device.type == "cpu" and tensor.tolist() == list(range(10))


@pytest.mark.skipif(NO_CUDA, reason="pinned host buffers need CUDA")
def test_staging_on_cuda_reuses_pinned_buffers():
    staging = Staging(torch.device("cuda", 0))
    first = staging("ids", np.arange(300, dtype=np.int64))
    buffer = staging.buffers["ids"]
    assert buffer.is_pinned() and first.is_cuda
    second = staging("ids", np.arange(5, dtype=np.int64))
    assert staging.buffers["ids"] is buffer
    assert second.tolist() == list(range(5)) and first.tolist() == list(range(300))
    staging("ids", np.arange(1000, dtype=np.int64))
    assert staging.buffers["ids"].numel() >= 1000


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_serve_refuses_half_precision_on_the_cpu_at_startup(caplog):
    """A clear error and exit status 2 before anything listens: never a server that says it
    is healthy and fails every request."""
    from xllm.cli import main

    assert main(["serve", "--dtype", "bfloat16", "--port", "1"]) == 2
    assert "not served on the CPU" in caplog.text


def test_engine_imports_without_gguf():
    # GPU machines may lack the gguf package: only a GGUF model's load may need it.
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "import xllm.engine.llm, xllm.engine.async_engine\n"
        "assert 'xllm.model.gguf_weights' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("shape,dtype", [
    ((7, 5), torch.float32), ((3, 100, 16, 3, 64), torch.bfloat16),
    ((2, 40, 16, 2, 64), torch.float32)])
def test_zeros_are_zeros_and_large_ones_start_on_a_huge_page(shape, dtype):
    cpu = torch.device("cpu")
    t = zeros(shape, dtype, cpu)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    if t.numel() * t.element_size() >= HUGE_PAGE:
        assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(1)  # writable, and all of it is the tensor's own
    assert t.sum().item() == t.numel()


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages on this host")
def test_a_large_host_tensor_gets_huge_pages():
    t = zeros((8 * HUGE_PAGE // 4,), torch.float32, torch.device("cpu"))
    assert _anon_huge_kib(t.data_ptr()) >= HUGE_PAGE // 1024
