"""Builds the C++ kernels of csrc/ into the extension module xllm._C.

Everything is compiled for the portable baseline of the target (no -march=native), and the
SIMD kernels once more per instruction-set variant on x86-64 (AVX2, AVX-512; see
csrc/simd.h): xllm._C runs the best one the CPU supports, so one build serves every host.
"""

import glob
import os
import platform

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

SIMD_SOURCES = [
    "csrc/attention.cpp", "csrc/fused.cpp", "csrc/int8_linear.cpp", "csrc/linear.cpp",
    "csrc/panel_linear.cpp", "csrc/quant.cpp", "csrc/topk.cpp",
]
# -Wno-psabi: the 64-byte vectors of simd.h never leave a variant's namespace, so GCC's notes
# on how their ABI differs between instruction sets do not apply. -falign-loops=64: hot loops
# start on a cache line, else their speed depends on where they land (M = 1 linear: +-10%).
SIMD_FLAGS = ["-Wno-psabi", "-falign-loops=64"]
# Variant name -> the macro that selects it in csrc/simd.h (the baseline defines none).
VARIANTS = {"generic": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    VARIANTS |= {"avx2": [("XLLM_ISA_AVX2", None)], "avx512": [("XLLM_ISA_AVX512", None)]}


class BuildExt(build_ext):
    """Compiles SIMD_SOURCES once per variant, each into its own folder, and links them in."""

    def build_extension(self, ext: Pybind11Extension) -> None:
        ext.extra_objects = []
        for name, macros in VARIANTS.items():
            ext.extra_objects += self.compiler.compile(
                SIMD_SOURCES,
                output_dir=os.path.join(self.build_temp, name),
                macros=ext.define_macros + macros,
                include_dirs=ext.include_dirs,
                extra_postargs=ext.extra_compile_args + SIMD_FLAGS,
                depends=ext.depends,
            )
        super().build_extension(ext)


ext_modules = [
    Pybind11Extension(
        "xllm._C",
        sorted(set(glob.glob("csrc/*.cpp")) - set(SIMD_SOURCES)),
        depends=SIMD_SOURCES + sorted(glob.glob("csrc/*.h")),
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
