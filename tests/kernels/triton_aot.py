"""Compile recorded Triton launches ahead of time for a GPU target, on a machine without a GPU.

A tool of test_triton_kernels.py, not of the package: with TRITON_INTERPRET unset,
swap a kernel for a `LaunchRecorder`, run the Python wrapper on CPU tensors, then
`compile_launch` each recorded launch for, say, sm_90. It specializes arguments the
way the JIT does at launch (pointer alignment, integers equal to 1 or divisible by
16), so type errors and shape limits that the interpreter does not check show up here.
Uses Triton internals (`create_function_from_signature`, `_pack_args`).
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]


@dataclass
class LaunchRecorder:
    """Stands in for a JIT kernel: `recorder[grid](*args, **kwargs)` records instead of running."""

    kernel: JITFunction
    launches: list[Launch] = field(default_factory=list)

    def __getitem__(self, grid: tuple):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.kernel, grid, args, kwargs))

        return launch


def compile_launch(launch: Launch, target: GPUTarget = HOPPER) -> Any:
    """Compile the kernel exactly as the JIT would for these arguments, for `target`."""
    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def ptxas_usage(compiled: Any, arch: str = "sm_90a") -> str:
    """Registers and spills of a compiled kernel, from the ptxas bundled with Triton."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        ptxas = os.path.join(bin_dir, name)
        if not os.path.exists(ptxas):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            run = subprocess.run(
                [ptxas, f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "kernel.o")],
                capture_output=True,
                text=True,
            )
        if run.returncode == 0:
            regs = re.search(r"Used (\d+) registers", run.stderr)
            spills = re.search(r"(\d+) bytes spill stores", run.stderr)
            regs_text = regs.group(1) if regs else "?"
            return f"{regs_text} registers, {spills.group(1) if spills else '?'} B spilled"
    return "ptxas unavailable"
