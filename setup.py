"""Builds the C++ kernels of csrc/ into the extension module xllm._C."""

import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "xllm._C",
        sorted(glob.glob("csrc/*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3", "-march=native", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
