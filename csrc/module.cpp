// The pybind11 module xllm._C: the CPU kernels (filled by the kernels issue).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) { m.doc() = "xllm CPU kernels"; }
