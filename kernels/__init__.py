"""Triton kernels (the CUDA path), shipped as the package `xllm_triton`."""
