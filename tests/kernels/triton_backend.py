"""The setting of the Triton kernel tests: compiled on a CUDA machine, else run under
TRITON_INTERPRET=1, which importing this module sets when there is no GPU (the importing test
module is skipped where neither can run). Import it before anything imports triton."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Only effective if triton is not imported yet (transformers imports it): a suite that
    # imports transformers first should set this in tests/conftest.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")

from xllm.ops import cuda as tri  # noqa: E402

if not CUDA and not tri.INTERPRETED:
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set; set it before the first import "
        "(tests/conftest.py) to run the Triton kernels on the CPU",
        allow_module_level=True,
    )

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
