"""Fixtures of the kernel tests: the C++ kernels under each instruction-set variant.

A missing or broken xllm._C fails every C++ test (in the `cpu_isa` fixture, with the
reason) rather than the collection, so that the Triton tests here still run.
"""

from collections.abc import Iterator

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that uses `cpu_isa` once per SIMD variant this CPU runs, fastest first."""
    if "cpu_isa" in metafunc.fixturenames:
        try:
            import xllm._C as _C

            isas = _C.supported_isas()[::-1]
        except ImportError:
            isas = ["unavailable"]
        metafunc.parametrize("cpu_isa", isas, indirect=True)


@pytest.fixture
def cpu_isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """The variant of xllm._C's SIMD kernels (generic, avx2, avx512) that runs in the test."""
    try:
        from xllm.ops.cpu import _C
    except ImportError as error:
        pytest.fail(f"the C++ kernels do not import: {error}", pytrace=False)
    previous = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(previous)
