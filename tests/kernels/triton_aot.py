"""Compile recorded Triton launches ahead of time for a GPU target, on a machine without a GPU.

A tool of the Triton kernel tests, not of the package: `run_script` starts a Python with
TRITON_INTERPRET unset, whose script swaps kernels for `LaunchRecorder`s (`record`), runs
the Python wrappers on CPU tensors, then compiles each recorded launch for sm_90
(`compile_recorded`, one line of output per launch). It specializes arguments the
way the JIT does at launch (pointer alignment, integers equal to 1 or divisible by
16), so type errors and shape limits that the interpreter does not check show up here.
Uses Triton internals (`create_function_from_signature`, `_pack_args`).
"""

import contextlib
import os
import re
import subprocess
import sys
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


def record(module: Any, names: tuple[str, ...]) -> list[LaunchRecorder]:
    """Swap the kernels `names` of `module` (xllm.ops.cuda) for recorders, launched on any
    device."""
    recorders = [LaunchRecorder(getattr(module, name)) for name in names]
    for name, recorder in zip(names, recorders, strict=True):
        setattr(module, name, recorder)
    module._launch_context = lambda tensor: contextlib.nullcontext()
    return recorders


def compile_recorded(recorders: list[LaunchRecorder], hidden: tuple[str, ...] = (),
                     spills_fail: bool = False) -> int:
    """Compile every recorded launch for sm_90, printing "ok ..." or "FAIL ..." for each (the
    upper-case arguments shown, less `hidden`); how many failed (or spilled registers, with
    `spills_fail`)."""
    failed = 0
    for recorder in recorders:
        assert recorder.launches, recorder.kernel
        for launch in recorder.launches:
            shown = {k: v for k, v in launch.kwargs.items() if k.isupper() and k not in hidden}
            try:
                compiled = compile_launch(launch)
            except Exception as error:
                failed += 1
                print(f"FAIL {launch.kernel.__name__} {shown}: {type(error).__name__}: {error}")
                continue
            usage = ptxas_usage(compiled)
            print(f"ok {launch.kernel.__name__} {shown}: {usage}")
            if spills_fail and " 0 B spilled" not in usage and "unavailable" not in usage:
                failed += 1
                print("  spills registers")
    return failed


def run_script(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a new Python that compiles Triton (not the interpreter), in this folder."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=os.path.dirname(os.path.abspath(__file__)),  # so that it imports this module
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
