"""Where the engine runs: the device and dtype a configuration names, the KV cache's share of
a GPU's memory, the host buffers a step's inputs are staged in, and large host tensors in
huge pages."""

import mmap

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "bfloat16")  # "auto": the model's dtype
# torch's names; "medium" allows bfloat16 products, "low" (xllm's) int8 ones (x rounded to int8
# per block of 32, as llama.cpp does) where the weights are q8_0, q4_0, q4_1 or int8, else
# bfloat16.
MATMUL_PRECISIONS = ("highest", "medium", "low")


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when torch sees a GPU, else cpu; ValueError for a device not at hand."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: xllm runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA, float32 on the CPU, whose C++ kernels take float32 only."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"dtype {name} is not served on the CPU (its kernels take float32); "
                         "use --dtype float32 or auto (--matmul-precision medium lets the "
                         "linear layers multiply in bfloat16)")
    return dtype


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: "auto" is the model's `dtype`; ValueError for an unknown name."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    return dtype if name == "auto" else DTYPES[name]


def free_gpu_memory(device: torch.device, utilization: float, reserve: int) -> int:
    """Bytes the KV cache may take: `utilization` of the GPU's memory, less what is in use
    (by anyone) and `reserve` (the activations' peak)."""
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization) - (total - free) - reserve
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache: {utilization:.0%} of "
                         f"{total / 2**30:.1f} GiB is taken by the weights and activations "
                         "(raise --gpu-memory-utilization or use a smaller model)")
    return budget


HUGE_PAGE = 2 << 20  # bytes of an x86-64 transparent huge page


def _huge_page_block(nbytes: int) -> torch.Tensor:
    """nbytes (a huge page or more) of fresh private memory as uint8, zero (the kernel's
    fresh pages are), starting on a huge-page boundary, asked for huge pages before anything
    touches it. An anonymous mapping of its own: the heap hands out pages already used, which
    stay 4 KiB. Where the kernel has no huge pages, or refuses them, they stay 4 KiB too."""
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(memory, dtype=torch.uint8)  # holds `memory` while it lives
    start = -raw.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return raw[start:start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros`; on the CPU, a tensor of a huge page or more lives in huge pages (see
    `_huge_page_block`). The paged KV cache is read a block at a time from anywhere in it:
    with 4 KiB pages nearly every block missed the TLB (64 decodes of 220 keys, 30 layers,
    bfloat16 blocks drawn from 1.5 GB: 19.8 ms with 4 KiB pages, 17.9 with huge pages)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    # Already zero: the write only brings the pages in now rather than during serving.
    return _huge_page_block(nbytes).view(dtype).view(shape).zero_()


def huge_page_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU tensors laid end to end, each on a 64-byte boundary, in one block of
    huge pages (see `_huge_page_block`). A decode step reads every weight once, in order: one
    by one in 4 KiB pages they missed the TLB every 4 KiB (the 120 Q4_1 linears of the default
    model and its LM head at M = 1, one process: 5.57 ms, 4.88 in huge pages)."""
    align = 64
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for nbytes in sizes:
        offsets.append(total)
        total += -(-nbytes // align) * align
    block = _huge_page_block(total) if total >= HUGE_PAGE else torch.empty(total, dtype=torch.uint8)
    return [block[at:at + nbytes].view(t.dtype).view(t.shape).copy_(t)
            for t, at, nbytes in zip(tensors, offsets, sizes)]


class Staging:
    """A step's input arrays on their way to the device: on CUDA through pinned host
    buffers (one per name, kept between steps, grown on demand) and copies that do not
    block the host; a buffer is written again only once its last copy is done. On the
    CPU, the arrays themselves."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.cuda.Event] = {}

    def __call__(self, name: str, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < tensor.numel() or buffer.dtype != tensor.dtype:
            buffer = torch.empty(max(tensor.numel(), 256), dtype=tensor.dtype, pin_memory=True)
            self.buffers[name] = buffer
        elif name in self.copied:
            self.copied[name].synchronize()
        host = buffer[: tensor.numel()].view(tensor.shape)
        host.copy_(tensor)
        out = host.to(self.device, non_blocking=True)
        self.copied[name] = torch.cuda.Event()
        self.copied[name].record()
        return out
