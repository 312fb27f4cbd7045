// The pybind11 module xllm._C: binds the CPU kernels, taking raw data pointers and sizes.
//
// The Python side (xllm/ops/cpu.py) checks dtypes, devices and layouts and passes
// tensor.data_ptr() values; the kernels run with the GIL released. XLLM_CPU_ISA (generic,
// avx2, avx512) picks the instruction-set variant of the SIMD kernels at import, else the
// best the CPU supports runs; `set_isa` switches it later (tests).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "decoder.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// (weight, format name, row bytes, bias or 0, N, K, bfloat16 products allowed, layout:
// "rows", "int8" or "panels") from Python.
using LinearSpec =
    std::tuple<uintptr_t, std::string, int64_t, uintptr_t, int64_t, int64_t, bool, std::string>;

xllm::Layout layout_of(const std::string& name) {
  if (name == "rows") return xllm::Layout::kRows;
  if (name == "int8") return xllm::Layout::kInt8;
  if (name == "panels") return xllm::Layout::kPanels;
  throw std::invalid_argument("unknown weight layout '" + name + "'");
}
// (input norm, qkv, o, post-attention norm, gate_up, down).
using LayerSpec =
    std::tuple<uintptr_t, LinearSpec, LinearSpec, uintptr_t, LinearSpec, LinearSpec>;

xllm::LinearWeights linear_weights(const LinearSpec& spec) {
  const auto& [weight, format, row_bytes, bias, n, k, bf16, layout] = spec;
  return {ptr<const void>(weight), xllm::quant_format(format), row_bytes, ptr<const float>(bias),
          n, k, bf16, layout_of(layout)};
}

xllm::DecoderStack make_stack(int64_t hidden, int64_t heads, int64_t kv_heads,
                              int64_t head_size, int64_t intermediate, double eps, double scale,
                              const std::vector<LayerSpec>& layers, int64_t linear_max_rows) {
  std::vector<xllm::LayerWeights> weights;
  for (const auto& [input_norm, qkv, o, post_norm, gate_up, down] : layers)
    weights.push_back({ptr<const float>(input_norm), linear_weights(qkv), linear_weights(o),
                       ptr<const float>(post_norm), linear_weights(gate_up),
                       linear_weights(down)});
  const xllm::DecoderShape shape{hidden,       heads,
                                 kv_heads,     head_size,
                                 intermediate, static_cast<float>(eps),
                                 static_cast<float>(scale)};
  return xllm::DecoderStack(shape, std::move(weights), linear_max_rows);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xllm CPU kernels (C++ and OpenMP)";
  m.def(
      "paged_attention",
      [](uintptr_t q, int64_t q_stride, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
         uintptr_t query_start_loc, uintptr_t seq_lens, uintptr_t block_tables,
         int64_t num_tokens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
         int64_t head_size, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
         double scale, bool kv_bf16) {
        xllm::AttentionArgs a{ptr<const float>(q),         q_stride,
                              ptr<const void>(k_cache),    ptr<const void>(v_cache),
                              ptr<float>(out),             ptr<const int32_t>(query_start_loc),
                              ptr<const int32_t>(seq_lens), ptr<const int32_t>(block_tables),
                              num_tokens,                  num_seqs,
                              num_heads,                   num_kv_heads,
                              head_size,                   num_blocks,
                              block_size,                  max_blocks,
                              static_cast<float>(scale),   kv_bf16};
        xllm::paged_attention(a);
      },
      py::call_guard<py::gil_scoped_release>(), "Paged attention; see xllm.ops.reference.");
  m.def(
      "write_kv",
      [](uintptr_t key, int64_t key_stride, uintptr_t value, int64_t value_stride,
         uintptr_t k_cache, uintptr_t v_cache, bool kv_bf16, uintptr_t slot_mapping,
         bool slots_int64, int64_t num_tokens, int64_t row_size, int64_t num_slots) {
        xllm::write_kv(ptr<const float>(key), key_stride, ptr<const float>(value), value_stride,
                       ptr<void>(k_cache), ptr<void>(v_cache), kv_bf16,
                       ptr<const void>(slot_mapping), slots_int64, num_tokens, row_size,
                       num_slots);
      },
      py::call_guard<py::gil_scoped_release>(), "KV cache write; see xllm.ops.reference.");
  m.def(
      "copy_blocks",
      [](uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_mapping, bool ids_int64,
         int64_t num_pairs, int64_t num_layers, int64_t num_blocks, int64_t block_bytes) {
        xllm::copy_blocks(ptr<void>(k_cache), ptr<void>(v_cache), ptr<const void>(block_mapping),
                          ids_int64, num_pairs, num_layers, num_blocks, block_bytes);
      },
      py::call_guard<py::gil_scoped_release>(), "KV block copies; see xllm.ops.reference.");
  m.def(
      "topk_logprobs",
      [](uintptr_t logits, int64_t ld, int64_t rows, int64_t vocab, int64_t k,
         uintptr_t token_ids, uintptr_t values, uintptr_t indices, uintptr_t chosen) {
        xllm::topk_logprobs(ptr<const float>(logits), ld, rows, vocab, k,
                            ptr<const int64_t>(token_ids), ptr<float>(values),
                            ptr<int64_t>(indices), ptr<float>(chosen));
      },
      py::call_guard<py::gil_scoped_release>(), "Top-k logprobs; see xllm.ops.reference.");
  m.def(
      "argmax_rows",
      [](uintptr_t logits, int64_t ld, int64_t rows, int64_t vocab, uintptr_t out) {
        xllm::argmax_rows(ptr<const float>(logits), ld, rows, vocab, ptr<int64_t>(out));
      },
      py::call_guard<py::gil_scoped_release>(), "Greedy tokens; see xllm.ops.reference.");
  m.def(
      "beam_prune",
      [](uintptr_t beam_scores, uintptr_t cand_tokens, uintptr_t cand_logprobs, int64_t groups,
         int64_t width, int64_t cands, int64_t num_keep, uintptr_t parents, uintptr_t tokens,
         uintptr_t scores) {
        xllm::beam_prune(ptr<const float>(beam_scores), ptr<const int64_t>(cand_tokens),
                         ptr<const float>(cand_logprobs), groups, width, cands, num_keep,
                         ptr<int64_t>(parents), ptr<int64_t>(tokens), ptr<float>(scores));
      },
      py::call_guard<py::gil_scoped_release>(), "Beam pruning; see xllm.ops.reference.");
  m.def(
      "linear",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, int64_t M, int64_t N,
         int64_t K) {
        xllm::linear(ptr<const float>(x), ptr<const float>(weight), ptr<const float>(bias),
                     ptr<float>(y), M, N, K);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y = x @ weight^T (+ bias; pass 0 for none); see xllm.ops.reference.");
  m.def(
      "quant_linear",
      [](uintptr_t x, uintptr_t weight, const std::string& format, int64_t row_bytes,
         uintptr_t bias, uintptr_t y, int64_t M, int64_t N, int64_t K, bool bf16) {
        const int f = xllm::quant_format(format);
        py::gil_scoped_release release;
        xllm::quant_linear(ptr<const float>(x), ptr<const uint8_t>(weight), f, row_bytes,
                           ptr<const float>(bias), ptr<float>(y), M, N, K, bf16);
      },
      py::arg("x"), py::arg("weight"), py::arg("format"), py::arg("row_bytes"), py::arg("bias"),
      py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("bf16") = false,
      "y = x @ W^T (+ bias; 0 for none) for W's quantized rows; bf16: bfloat16 products "
      "summed in float32. See xllm.ops.reference.");
  m.def("bf16_products", &xllm::bf16_products,
        "Whether quant_linear with bf16 allowed multiplies M rows of x in bfloat16 here.");
  m.def(
      "int8_linear",
      [](uintptr_t x, uintptr_t packed, const std::string& format, uintptr_t bias, uintptr_t y,
         int64_t M, int64_t N, int64_t K) {
        const int f = xllm::quant_format(format);
        py::gil_scoped_release release;
        xllm::int8_linear(ptr<const float>(x), ptr<const uint8_t>(packed), f,
                          ptr<const float>(bias), ptr<float>(y), M, N, K);
      },
      "y = x @ W^T (+ bias; 0 for none) with int8 products, W packed by "
      "xllm.ops.quant.pack_int8. See xllm.ops.reference.");
  m.def("int8_products_fast", &xllm::int8_products_fast,
        "Whether int8_linear runs its vectorized tile (AVX-512 VNNI) here.");
  m.def(
      "panel_linear",
      [](uintptr_t x, uintptr_t panels, uintptr_t bias, uintptr_t y, int64_t M, int64_t N,
         int64_t K) {
        xllm::panel_linear(ptr<const float>(x), ptr<const float>(panels), ptr<const float>(bias),
                           ptr<float>(y), M, N, K);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y = x @ W^T (+ bias; 0 for none) in float32, W packed by xllm.ops.panels.pack_panels. "
      "See xllm.ops.reference.");
  m.def(
      "dequantize",
      [](uintptr_t weight, const std::string& format, int64_t row_bytes, uintptr_t rows, int64_t R,
         int64_t N, uintptr_t out, int64_t K) {
        const int f = xllm::quant_format(format);
        py::gil_scoped_release release;
        xllm::dequantize(ptr<const uint8_t>(weight), f, row_bytes, ptr<const int64_t>(rows), R, N,
                         ptr<float>(out), K);
      },
      "out [R, K] = rows (0: all N) of W dequantized; see xllm.ops.reference.");
  m.def(
      "rms_norm",
      [](uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t residual_stride,
         uintptr_t weight, uintptr_t out, int64_t T, int64_t H, float eps) {
        xllm::rms_norm(ptr<const float>(x), x_stride, ptr<float>(residual), residual_stride,
                       ptr<const float>(weight), ptr<float>(out), T, H, eps);
      },
      py::call_guard<py::gil_scoped_release>(),
      "RMSNorm, after residual += x when residual is not 0; see xllm.ops.reference.");
  m.def(
      "silu_mul",
      [](uintptr_t x, int64_t x_stride, uintptr_t out, int64_t T, int64_t I) {
        xllm::silu_mul(ptr<const float>(x), x_stride, ptr<float>(out), T, I);
      },
      py::call_guard<py::gil_scoped_release>(), "silu(gate) * up; see xllm.ops.reference.");
  m.def(
      "rotary_write_kv",
      [](uintptr_t qkv, int64_t stride, uintptr_t cos, uintptr_t sin, int64_t T, int64_t H,
         int64_t Hkv, int64_t D, uintptr_t k_cache, uintptr_t v_cache, bool kv_bf16,
         uintptr_t slots, bool slots_int64, int64_t num_slots) {
        xllm::rotary_write_kv(ptr<float>(qkv), stride, ptr<const float>(cos),
                              ptr<const float>(sin), T, H, Hkv, D, ptr<void>(k_cache),
                              ptr<void>(v_cache), kv_bf16, ptr<const void>(slots), slots_int64,
                              num_slots);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Rotary of q and k in place, then k and v into the cache; see xllm.ops.reference.");
  py::class_<xllm::DecoderStack>(m, "DecoderStack",
                                 "Every decoder layer of a Llama / Qwen2 model in one call.")
      .def(py::init(&make_stack))
      .def(
          "run",
          [](xllm::DecoderStack& stack, uintptr_t x, uintptr_t out, int64_t T, uintptr_t cos,
             uintptr_t sin, uintptr_t slots, bool slots_int64, uintptr_t query_start_loc,
             uintptr_t seq_lens, uintptr_t block_tables, int64_t num_seqs, int64_t max_blocks,
             int64_t block_size, int64_t num_slots, const std::vector<uintptr_t>& k_caches,
             const std::vector<uintptr_t>& v_caches, bool kv_bf16) {
            xllm::DecoderStep step{T,
                                   ptr<const float>(cos),
                                   ptr<const float>(sin),
                                   ptr<const void>(slots),
                                   slots_int64,
                                   ptr<const int32_t>(query_start_loc),
                                   ptr<const int32_t>(seq_lens),
                                   ptr<const int32_t>(block_tables),
                                   num_seqs,
                                   max_blocks,
                                   block_size,
                                   num_slots,
                                   {},
                                   {},
                                   kv_bf16};
            for (uintptr_t p : k_caches) step.k_caches.push_back(ptr<void>(p));
            for (uintptr_t p : v_caches) step.v_caches.push_back(ptr<void>(p));
            py::gil_scoped_release release;
            stack.run(step, ptr<const float>(x), ptr<float>(out));
          },
          "out [T, hidden] = the decoder layers on x [T, hidden] (see xllm.ops.cpu).");
  m.def("supported_isas", &xllm::supported_isas,
        "Instruction-set variants of the SIMD kernels this CPU runs, slowest first.");
  m.def("set_isa", &xllm::set_isa, "Run the named variant from now on (ValueError if unsupported).");
  m.def("isa", &xllm::isa, "The variant of the SIMD kernels that runs.");
  const char* forced = std::getenv("XLLM_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    try {
      xllm::set_isa(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("XLLM_CPU_ISA: ") + e.what());
    }
  }
}
