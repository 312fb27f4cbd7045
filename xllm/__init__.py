"""xllm: an OpenAI-compatible LLM inference server built on its own kernels."""

import os

__version__ = "0.1.0"

# OpenMP threads (libgomp, shared by torch and the C++ kernels) spin this many times after
# a parallel region before they sleep; libgomp's default, 300,000, keeps a core busy for a
# while after every kernel. On a 2-core host that core is taken from the engine's Python
# and the HTTP thread between kernels: served at concurrency 1, 2,000 cut the time per
# output token by about 1 ms (7.4 against 9.0 ms, the same load one after the other), and
# left concurrency 16 and 64 as they were. libgomp reads it once, when torch loads, so it
# holds only where xllm is imported first (`xllm serve` is); a value set by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "2000")
